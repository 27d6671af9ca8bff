import io
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from styledistill.pipeline.scan import scan_sources
from styledistill.pipeline.sources import SourceEntry, iter_source_entries
from styledistill.schemas.config import RunConfig, SourcePool


def _jpeg(path, seed: int, size: tuple[int, int] = (160, 120), brightness: int | None = None) -> bytes:
    """A smooth random picture (distinct pHash per seed); with `brightness`, kept within +-20 of that grey."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3)).astype(np.float64)
    if brightness is not None:
        small = brightness - 20 + small * (40 / 255)
    img = Image.fromarray(small.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _names(entries: list[SourceEntry]) -> list[str]:
    return [os.path.basename(e.uri) for e in entries]


def _config(*pools: dict, **dedup) -> RunConfig:
    return RunConfig(sources=list(pools), filters={"dedup": dedup} if dedup else {})


def _rows(run) -> pd.DataFrame:
    return pq.read_table(os.path.join(run, "sources.parquet")).to_pandas().set_index("uri", drop=False)


# --- listing pools ----------------------------------------------------------------------------------------


def test_folder_is_recursive_sorted_and_filtered(tmp_path):
    for name in ["b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp", "notes.txt", "e.gif"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    entries = list(iter_source_entries(SourcePool(uri=str(tmp_path), label="realistic"), 3))
    assert _names(entries) == ["a.PNG", "b.jpg", "c.jpeg", "d.webp"]
    assert {(e.label, e.pool, e.error) for e in entries} == {("realistic", 3, None)}
    url_entries = list(iter_source_entries(SourcePool(uri=f"file://{tmp_path}", label="classify"), 0))
    assert [e.uri for e in url_entries][0] == f"file://{tmp_path}/a.PNG"
    assert {e.label for e in url_entries} == {None}


def test_glob_pool(tmp_path):
    for name in ["x/a1.jpg", "x/b1.jpg", "y/a2.jpg", "y/a3.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    entries = list(iter_source_entries(SourcePool(uri=str(tmp_path / "*" / "a*"), label="stylized"), 0))
    assert _names(entries) == ["a1.jpg", "a2.jpg"]


def test_parquet_manifest_streams_row_groups_with_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    paths = ["imgs/z.jpg", "imgs/a.jpg", "/abs/p.png", "s3://bucket/k.jpg", ""]
    table = pa.table({"file": paths, "x": [1, 2, 3, 4, 5]})
    pq.write_table(table, tmp_path / "data" / "m.parquet", row_group_size=2)
    pool = SourcePool(uri=str(tmp_path / "data" / "m.parquet"), label="realistic", path_column="file")
    entries = list(iter_source_entries(pool, 1))
    # Row order is kept (no whole-manifest sort), across row groups.
    assert [e.uri for e in entries[:4]] == [
        str(tmp_path / "data" / "imgs" / "z.jpg"),
        str(tmp_path / "data" / "imgs" / "a.jpg"),
        "/abs/p.png",
        "s3://bucket/k.jpg",
    ]
    assert entries[4].error == "empty path in manifest row 4" and entries[4].label is None


def test_csv_manifest_label_column(tmp_path):
    csv = "path,label\nr.jpg,realistic\ns.jpg, Stylized\nq.jpg,painting\nn.jpg,\n"
    (tmp_path / "m.csv").write_text(csv)
    pool = SourcePool(uri=f"file://{tmp_path}/m.csv", label="column")
    entries = list(iter_source_entries(pool, 0))
    assert [e.uri for e in entries] == [f"file://{tmp_path}/{n}.jpg" for n in "rsqn"]
    assert [e.label for e in entries] == ["realistic", "stylized", None, None]
    assert entries[0].error is None and entries[1].error is None
    assert entries[2].error == "label column 'label' is 'painting'; expected realistic or stylized"
    assert entries[3].error == "label column 'label' is ''; expected realistic or stylized"


def test_pool_errors_are_clear(tmp_path):
    (tmp_path / "m.csv").write_text("filename\na.jpg\n")
    with pytest.raises(ValueError, match=r"source pool 2 .*no column 'path'; columns: filename"):
        list(iter_source_entries(SourcePool(uri=str(tmp_path / "m.csv"), label="realistic"), 2))
    with pytest.raises(ValueError, match="label 'column' needs a parquet or csv manifest"):
        list(iter_source_entries(SourcePool(uri=str(tmp_path), label="column"), 0))
    with pytest.raises(FileNotFoundError, match="folder not found"):
        list(iter_source_entries(SourcePool(uri=str(tmp_path / "nope"), label="realistic"), 0))


# --- scanning ---------------------------------------------------------------------------------------------


@pytest.fixture
def pools(tmp_path):
    """A realistic folder with an exact copy, a resized copy and bad files, and a stylized folder."""
    real, styl = tmp_path / "real", tmp_path / "styl"
    original = _jpeg(real / "a.jpg", seed=1, size=(320, 240))
    (real / "a_copy.jpg").write_bytes(original)
    resized = Image.open(io.BytesIO(original)).resize((200, 150), Image.Resampling.LANCZOS)
    resized.save(real / "a_small.png")
    _jpeg(real / "b.jpg", seed=2)
    (real / "empty.jpg").write_bytes(b"")
    (real / "text.png").write_text("not an image")
    (real / "tiny.jpg").write_bytes(_jpeg(tmp_path / "t.jpg", seed=3, size=(10, 10)))
    _jpeg(styl / "s1.jpg", seed=4)
    return tmp_path


def test_scan_records_duplicates_and_failures(pools):
    # The realistic pool and the run folder as file:// URLs, the stylized pool as a plain path.
    config = _config(
        {"uri": f"file://{pools}/real", "label": "realistic"},
        {"uri": str(pools / "styl"), "label": "stylized"},
    )
    run = str(pools / "run")
    kept = scan_sources(config, f"file://{run}")

    rows = _rows(run)
    real = f"file://{pools}/real"
    names = ["a.jpg", "a_copy.jpg", "a_small.png", "b.jpg", "empty.jpg", "text.png", "tiny.jpg"]
    style = str(pools / "styl" / "s1.jpg")
    assert list(rows["uri"]) == [f"{real}/{n}" for n in names] + [style]
    status = dict(zip(rows["uri"].str.rsplit("/", n=1).str[1], rows["status"]))
    assert status == {
        "a.jpg": "ok", "a_copy.jpg": "duplicate", "a_small.png": "duplicate", "b.jpg": "ok",
        "empty.jpg": "failed", "text.png": "failed", "tiny.jpg": "failed", "s1.jpg": "ok",
    }
    assert rows.loc[f"{real}/a_copy.jpg", "duplicate_of"] == f"{real}/a.jpg"
    assert rows.loc[f"{real}/a_small.png", "duplicate_of"] == f"{real}/a.jpg"
    assert rows.loc[f"{real}/empty.jpg", "error"] == "empty file (0 bytes)"
    assert rows.loc[f"{real}/text.png", "error"] == "not an image (unrecognised format)"
    assert rows.loc[f"{real}/tiny.jpg", "error"] == "too small (10x10, min side 64)"
    a = rows.loc[f"{real}/a.jpg"]
    assert (a["width"], a["height"], len(a["phash"]), a["label"]) == (320, 240, 16, "realistic")

    expected = [(f"{real}/a.jpg", "realistic"), (f"{real}/b.jpg", "realistic"), (style, "stylized")]
    assert [(k.uri, k.label) for k in kept] == expected
    assert all(k.sha256 == rows.loc[k.uri, "sha256"] for k in kept)


def test_scan_dedup_settings(pools):
    config = _config({"uri": str(pools / "real"), "label": "realistic"}, exact=True, phash_max_distance=None)
    scan_sources(config, str(pools / "run"))
    status = _rows(str(pools / "run"))["status"]
    assert status[str(pools / "real" / "a_copy.jpg")] == "duplicate"
    assert status[str(pools / "real" / "a_small.png")] == "ok"  # only a perceptual duplicate


def test_existing_sources_file_is_reused(pools):
    config = _config({"uri": str(pools / "real"), "label": "realistic"})
    run = str(pools / "run")
    first = scan_sources(config, run)
    stamp = os.stat(os.path.join(run, "sources.parquet")).st_mtime_ns
    _jpeg(pools / "real" / "new.jpg", seed=9)  # a later file is not picked up by a resumed run
    assert scan_sources(config, run) == first
    assert os.stat(os.path.join(run, "sources.parquet")).st_mtime_ns == stamp
    assert os.listdir(run) == ["sources.parquet"]  # and no temp file was left behind


class BrightnessLabeler:
    """Test double: bright pictures are 'stylized', dark ones 'realistic', mid-grey abstains."""

    def __init__(self):
        self.batches = []

    def label(self, images):
        self.batches.append(len(images))
        out = []
        for img in images:
            assert img.ndim == 3 and img.dtype == np.uint8
            mean = float(img.mean())
            out.append(("stylized", 0.9) if mean > 180 else ("realistic", 0.1) if mean < 70 else (None, 0.5))
        return out


def test_classify_pool(tmp_path):
    _jpeg(tmp_path / "mixed" / "bright.jpg", seed=1, brightness=230)
    _jpeg(tmp_path / "mixed" / "dark.jpg", seed=2, brightness=30)
    _jpeg(tmp_path / "mixed" / "grey.jpg", seed=3, brightness=128)
    (tmp_path / "mixed" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    config = _config({"uri": str(tmp_path / "mixed"), "label": "classify"})

    with pytest.raises(ValueError, match=r"source pool 0 \(.*mixed\) has label 'classify' but no labeler"):
        scan_sources(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "sources.parquet")

    labeler = BrightnessLabeler()
    kept = scan_sources(config, str(tmp_path / "run"), labeler=labeler)
    assert labeler.batches == [3]  # one batch per chunk, without the undecodable file
    labels = {os.path.basename(k.uri): k.label for k in kept}
    assert labels == {"bright.jpg": "stylized", "dark.jpg": "realistic"}
    rows = _rows(str(tmp_path / "run"))
    grey = rows.loc[str(tmp_path / "mixed" / "grey.jpg")]
    assert (grey["status"], grey["error"]) == ("unlabelled", "labeler abstained (p=0.500)")
    assert pd.isna(grey["label"])
    assert rows.loc[str(tmp_path / "mixed" / "broken.jpg"), "status"] == "failed"


def test_manifest_label_errors_become_failed_rows(tmp_path):
    _jpeg(tmp_path / "imgs" / "r.jpg", seed=1)
    _jpeg(tmp_path / "imgs" / "q.jpg", seed=2)
    csv = "path,label\nimgs/r.jpg,realistic\nimgs/q.jpg,painting\nimgs/gone.jpg,stylized\n"
    (tmp_path / "m.csv").write_text(csv)
    kept = scan_sources(_config({"uri": str(tmp_path / "m.csv"), "label": "column"}), str(tmp_path / "run"))
    assert [os.path.basename(k.uri) for k in kept] == ["r.jpg"]
    rows = _rows(str(tmp_path / "run"))
    assert list(rows["status"]) == ["ok", "failed", "failed"]
    assert rows["error"].iloc[1].startswith("label column 'label' is 'painting'")
    assert rows["error"].iloc[2] == f"file not found: {tmp_path / 'imgs' / 'gone.jpg'}"


@pytest.mark.slow  # starts the local Ray when it is the first test to need one
def test_scan_on_ray_matches_in_process(pools, local_ray):
    config = _config(
        {"uri": str(pools / "real"), "label": "realistic"}, {"uri": str(pools / "styl"), "label": "stylized"}
    )
    local = scan_sources(config, str(pools / "local"))
    remote = scan_sources(config, str(pools / "remote"), use_ray=True)
    assert remote == local
    pd.testing.assert_frame_equal(_rows(str(pools / "remote")), _rows(str(pools / "local")))

