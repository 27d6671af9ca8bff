"""`styledistill audit`: any triplet dataset scored on the stages of a run, and untrusted tars read safely.

The hostile tars are built here in code: unsafe names, duplicate keys, links, devices, FIFOs, oversize and
pickled members, truncated and corrupt tars, a gzip bomb, and images that are bombs, truncated, CMYK or 16-bit.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from styledistill.cli import app
from styledistill.io.tars import TarLimits, TarSkips, iter_tar_samples
from styledistill.pipeline.audit import INPUTS_FILE, audit_pipeline
from styledistill.schemas import manifest as mf
from styledistill.schemas.audit import parse_audit_config
from styledistill.schemas.config import ConfigError

SPECIAL_TYPES = {tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE}
ROLES = {"content": "src.jpg", "style": "ref.png", "target": "out.jpg", "instruction": "txt"}
CHEAP_SCORERS = [{"backend": "edges"}, {"backend": "noop"}, {"backend": "gram"}]


# ----------------------------------------------------------------------------------------------------------
# Building tars and images in code


def image_bytes(seed: int, fmt: str = "PNG", mode: str = "RGB", size=(96, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def sixteen_bit_png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 65535, (80, 96), dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (a decompression bomb), no pixel data needed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = (100000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def good_sample(key: str, seed: int, recipe: str = "RnS") -> list[tuple]:
    return [(f"{key}.src.jpg", image_bytes(seed, "JPEG")), (f"{key}.ref.png", image_bytes(seed + 1)),
            (f"{key}.out.jpg", image_bytes(seed + 2, "JPEG")), (f"{key}.txt", b"make it a painting"),
            (f"{key}.json", json.dumps({"recipe": recipe}).encode())]


def write_tar(path: Path, members: list[tuple], cut: int | None = None, gz: bool = False) -> Path:
    """members: (name, bytes) for regular files, or (name, TarInfo type, linkname) for the others."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member[0])
            if member[1] not in SPECIAL_TYPES:
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
            else:
                info.type = member[1]
                info.linkname = member[2] if len(member) > 2 else ""
                tar.addfile(info)
    data = buf.getvalue()[:cut] if cut else buf.getvalue()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def gzip_bomb(path: Path, zero_bytes: int) -> Path:
    """A .tar.gz whose one member is `zero_bytes` of zeros: tiny on disk, huge decompressed."""
    info = tarfile.TarInfo("bomb.src.jpg")
    info.size = zero_bytes
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    parts = [comp.compress(info.tobuf(tarfile.PAX_FORMAT))]
    chunk = b"\x00" * (1 << 20)
    for _ in range(zero_bytes // len(chunk)):
        parts.append(comp.compress(chunk))
    parts.append(comp.compress(b"\x00" * 1024) + comp.flush())
    path.write_bytes(b"".join(parts))
    return path


def hostile_set(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    tars = {}
    tars["good"] = write_tar(root / "good.tar", [
        *good_sample("s000", 0), *good_sample("s001", 10, "sns"), ("s001.cls", b"7"),  # extra member: ignored
        *good_sample("s002", 20, "weird recipe!"),
    ])
    tars["names"] = write_tar(root / "names.tar", [
        ("../evil.src.jpg", image_bytes(1, "JPEG")), ("../evil.ref.png", image_bytes(2)),
        ("../evil.out.jpg", image_bytes(3, "JPEG")),
        ("/abs/k.src.jpg", image_bytes(4, "JPEG")),
        ("ctl\x01x.src.jpg", image_bytes(5, "JPEG")),
        *good_sample("dup", 30), *good_sample("other", 40), *good_sample("dup", 50),  # duplicate key
        ("twice.src.jpg", image_bytes(6, "JPEG")), ("twice.src.jpg", image_bytes(7, "JPEG")),
    ])
    tars["types"] = write_tar(root / "types.tar", [
        ("folder", tarfile.DIRTYPE),
        ("sym.src.jpg", tarfile.SYMTYPE, "/etc/passwd"), ("sym.ref.png", image_bytes(8)),
        ("sym.out.jpg", image_bytes(9, "JPEG")),
        ("hard.src.jpg", tarfile.LNKTYPE, "good.tar"),
        ("dev.src.jpg", tarfile.CHRTYPE), ("fifo.src.jpg", tarfile.FIFOTYPE),
    ])
    tars["members"] = write_tar(root / "members.tar", [
        ("big.src.jpg", b"\xff" * 300_000), ("big.ref.png", image_bytes(11)), ("big.out.jpg", image_bytes(12, "JPEG")),
        *good_sample("pick", 60), ("pick.pth", b"\x80\x04cos\nsystem\n."), ("pick.npy", b"\x93NUMPY"),
        ("norole.src.jpg", image_bytes(13, "JPEG")), ("norole.out.jpg", image_bytes(14, "JPEG")),
    ])
    tars["images"] = write_tar(root / "images.tar", [
        ("bomb.src.jpg", png_bomb()), ("bomb.ref.png", image_bytes(15)), ("bomb.out.jpg", image_bytes(16, "JPEG")),
        ("trunc.src.jpg", image_bytes(17, "JPEG")[:300]), ("trunc.ref.png", image_bytes(18)),
        ("trunc.out.jpg", image_bytes(19, "JPEG")),
        ("cmyk.src.jpg", image_bytes(20, "JPEG", "CMYK")), ("cmyk.ref.png", sixteen_bit_png(21)),
        ("cmyk.out.jpg", image_bytes(22, "JPEG")),
        ("junk.src.jpg", b"not an image at all"), ("junk.ref.png", image_bytes(23)),
        ("junk.out.jpg", image_bytes(24, "JPEG")),
    ])
    full = write_tar(root / "whole.tar", [*good_sample("t0", 70), *good_sample("t1", 80)])
    with tarfile.open(full) as tar:  # cut in the middle of the second sample's target image
        member = tar.getmember("t1.out.jpg")
        cut = member.offset_data + member.size // 2
    tars["truncated"] = write_tar(root / "truncated.tar", [*good_sample("t0", 70), *good_sample("t1", 80)], cut=cut)
    full.unlink()
    corrupt = bytearray(write_tar(root / "corrupt.tar", [*good_sample("c0", 90), *good_sample("c1", 100)]).read_bytes())
    with tarfile.open(root / "corrupt.tar") as tar:  # garbage over the second sample's first header
        first = tar.getmember("c1.src.jpg").offset
    corrupt[first:first + 512] = b"\x13" * 512
    (root / "corrupt.tar").write_bytes(bytes(corrupt))
    tars["corrupt"] = root / "corrupt.tar"
    tars["bomb"] = gzip_bomb(root / "bomb.tar.gz", 64 * 1024**2)
    return tars


# ----------------------------------------------------------------------------------------------------------
# The reader alone


def _read(path: Path, **limits) -> tuple[list, TarSkips]:
    report = TarSkips()
    return list(iter_tar_samples(str(path), TarLimits(**limits), report)), report


def test_tar_reader_records_every_hostile_member_and_reads_nothing_it_should_not(tmp_path):
    tars = hostile_set(tmp_path / "in")
    samples, report = _read(tars["names"])
    by_key = {}
    for s in samples:
        by_key.setdefault(s.key, []).append(s)
    assert "path traversal" in by_key["../evil"][0].error and not by_key["../evil"][0].members
    assert "absolute path" in by_key["/abs/k"][0].error
    assert "control characters" in by_key["ctl\x01x"][0].error
    assert [s.error for s in by_key["dup"]][0] is None and "duplicate key" in by_key["dup"][1].error
    assert "duplicate member" in by_key["twice"][0].error
    assert report.error is None and report.samples == len(samples) == 7

    samples, report = _read(tars["types"])
    problems = {s.key: s.problems.get("src.jpg", "") for s in samples}
    assert "symlink" in problems["sym"] and "hardlink" in problems["hard"]
    assert "device" in problems["dev"] and "FIFO" in problems["fifo"]
    assert report.counts["directory"] == 1 and all(not s.members.get("src.jpg") for s in samples)

    samples, report = _read(tars["members"], max_member_bytes=200_000)
    by_key = {s.key: s for s in samples}
    assert "max_member_bytes" in by_key["big"].problems["src.jpg"]
    assert set(by_key["pick"].problems) == {"pth", "npy"} and "pth" not in by_key["pick"].members

    for name, expected in (("truncated", "truncated"), ("corrupt", "corrupt")):
        samples, report = _read(tars[name])
        assert report.error and expected in report.error, report.error
        assert samples and samples[0].error is None and len(samples[0].members) == 5  # the first sample is whole


def test_a_huge_extended_header_is_refused_before_it_is_read(tmp_path):
    huge = write_tar(tmp_path / "pax.tar", [*good_sample("ok", 1), ("x" * (2 * 1024**2) + ".src.jpg", b"1")])
    samples, report = _read(huge)
    assert "extended header" in report.error and [s.key for s in samples] == ["ok"]


def test_gzip_bomb_is_cut_at_max_tar_bytes(tmp_path):
    bomb = gzip_bomb(tmp_path / "bomb.tar.gz", 64 * 1024**2)
    assert bomb.stat().st_size < 200_000
    samples, report = _read(bomb, max_tar_bytes=8 * 1024**2)
    assert "max_tar_bytes" in report.error and "bomb" in report.error
    samples, report = _read(bomb, max_member_bytes=1024)  # within max_tar_bytes: the member is only skipped
    assert report.error is None and "max_member_bytes" in samples[0].problems["src.jpg"]


def test_audit_config_names_the_problem():
    with pytest.raises(ConfigError, match="needs roles"):
        parse_audit_config({"inputs": [{"kind": "webdataset", "uri": "x.tar"}]})
    with pytest.raises(ConfigError, match="pickled"):
        parse_audit_config({"inputs": [{"kind": "webdataset", "uri": "x.tar", "roles": {**ROLES, "target": "out.pth"}}]})
    with pytest.raises(ConfigError, match="not both"):
        parse_audit_config({"inputs": [{"kind": "run", "uri": "r", "recipe": "rns", "recipe_field": "json:recipe"}]})


# ----------------------------------------------------------------------------------------------------------
# End to end on the hostile set


def _manifest(run: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(str(run / "shards" / "*.parquet")))],
                     ignore_index=True)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_auditing_a_hostile_tar_set_accounts_for_every_sample_and_writes_only_under_out(tmp_path, monkeypatch):
    hostile_set(tmp_path / "in")
    config = {
        "name": "hostile",
        "inputs": [{"kind": "webdataset", "uris": [str(tmp_path / "in" / "{good,names,types,members,images}.tar"),
                                                   str(tmp_path / "in" / "truncated.tar"),
                                                   str(tmp_path / "in" / "corrupt.tar"),
                                                   str(tmp_path / "in" / "bomb.tar.gz")],
                    "roles": ROLES, "recipe_field": "json:recipe"}],
        "scorers": CHEAP_SCORERS,
        "filters": {"rules": [{"score": "noop.pixel_diff", "min": 0.01, "recipes": ["rns"]}]},
        "max_member_bytes": 200_000, "max_tar_bytes": 8 * 1024**2, "samples_per_shard": 8,
        "output": {"write_rejects": True},
    }
    (tmp_path / "audit.yaml").write_text(json.dumps(config))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "audit.yaml"), "--out", str(tmp_path / "out"), "--inline"])
    assert result.exit_code == 0, result.output
    written = {p for p in _tree(tmp_path) - before if not p.startswith("out")}
    assert written == set(), written  # nothing outside --out: not in the working folder, not beside the inputs

    out = tmp_path / "out"
    rows = _manifest(out)
    inputs = json.loads((out / INPUTS_FILE).read_text())
    files = {Path(f["uri"]).name: f for f in inputs["files"]}
    # Every sample the tars hold is a row; each unreadable tar adds one failed row naming it.
    assert len(rows) == inputs["samples"] + inputs["unreadable_files"]
    assert rows.key.is_unique and not rows.key.str.contains(r"\.").any()
    assert inputs["unreadable_files"] == 3 and files["bomb.tar.gz"]["error"].startswith("decompressed size")
    errors = " | ".join(rows.error.dropna())
    for expected in ("path traversal", "absolute path", "control characters", "duplicate key", "duplicate member",
                     "symlink", "hardlink", "device file", "FIFO", "max_member_bytes", "has no style member",
                     "too large", "Truncated File Read", "not an image", "unexpected end of data", "unreadable header",
                     "max_tar_bytes"):
        assert expected in errors, expected
    assert files["good.tar"]["skipped"] == {"extra member (ignored)": 1}  # txt and json are read; .cls is not
    assert files["members.tar"]["skipped"]["pickled member (never read)"] == 2
    # The good samples (and the CMYK / 16-bit one) are scored; recipes as given, or unknown.
    scored = rows[rows.status != mf.FAILED]
    assert len(scored) == 3 + 2 + 1 + 1 + 2  # good, names (dup, other), pick, cmyk, truncated/corrupt's first
    assert scored["score.noop.pixel_diff"].notna().all()
    assert set(rows.recipe) >= {"rns", "sns", "unknown"}
    # Filtered shards in our layout, and the indexes.
    sizes = json.loads((out / "shards" / mf.SIZES_FILE).read_text())
    assert sum(sizes.values()) == (rows.status == mf.ACCEPTED).sum() > 0
    assert json.loads((out / mf.WIDS_INDEX_FILE).read_text())["__kind__"] == "wids-shard-index-v1"
    report = (out / mf.REPORT_FILE).read_text()
    assert "bomb.tar.gz" in report  # the report says where the data came from

    # Resume: a second call writes no shard again.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    again = CliRunner().invoke(app, ["audit", str(tmp_path / "audit.yaml"), "--out", str(out), "--inline"])
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_audit_of_a_csv_manifest_reads_paths_per_role(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for n in range(3):
        for role, seed in (("c", 0), ("s", 1), ("t", 2)):
            (folder / f"{role}{n}.png").write_bytes(image_bytes(10 * n + seed))
    pd.DataFrame({
        "id": ["a.1", "b", "c", "d"],
        "content": ["c0.png", "c1.png", "c2.png", "c0.png"],
        "style": ["s0.png", "s1.png", "missing.png", ""],
        "target": ["t0.png", str(folder / "t1.png"), "t2.png", "t0.png"],
        "kind": ["RnR", "snr", "rns", "rns"],
    }).to_csv(folder / "triplets.csv", index=False)
    config = parse_audit_config({
        "inputs": [{"kind": "manifest", "uri": str(folder / "triplets.csv"), "key_column": "id",
                    "roles": {"content": "content", "style": "style", "target": "target"}, "recipe_field": "kind"}],
        "scorers": CHEAP_SCORERS, "output": {"uri": str(tmp_path / "out")},
    })
    audit_pipeline(config, inline=True, report=False)
    rows = _manifest(tmp_path / "out")
    assert list(rows.recipe) == ["rnr", "snr", "rns", "rns"]
    assert list(rows.status.eq(mf.FAILED)) == [False, False, True, True]
    assert "file not found" in rows.error[2] and "column 'style' empty" in rows.error[3]
    assert json.loads(rows.lineage[0])["target"]["source"]["uri"] == str(folder / "t0.png")

    from styledistill.report.compare import write_comparison

    write_comparison([str(tmp_path / "out"), str(tmp_path / "out")], str(tmp_path / "compare.html"))
    page = (tmp_path / "compare.html").read_text()
    assert "Datasets compared" in page and "score.noop.pixel_diff" in page and "manifest: " in page
    assert json.loads((tmp_path / "compare.json").read_text())["datasets"][0]["totals"]["samples"] == 4


# ----------------------------------------------------------------------------------------------------------
# Auditing the demo's own shards


@pytest.mark.slow
def test_auditing_the_demo_run_reproduces_its_scores_on_ray(sample_data, tmp_path):
    """Same scorers, same images as stored: the audit's score columns equal the run's, sample by sample; the
    same shards read as plain webdataset with a role mapping give the same scores again."""
    import ray

    from conftest import demo_config
    from styledistill.pipeline.run import run_pipeline

    run = demo_config(sample_data, tmp_path / "demo", "output.write_rejects=true")
    run_pipeline(run, inline=True, report=False)
    scorers = run.model_dump(mode="json")["scorers"]
    roles = {"content": "content.png", "style": "style.png", "target": "target.png", "instruction": "txt"}
    config = parse_audit_config({
        "inputs": [{"kind": "run", "uri": str(tmp_path / "demo")}],
        "scorers": scorers, "filters": run.model_dump(mode="json")["filters"], "samples_per_shard": 5,
        "output": {"uri": str(tmp_path / "audit")}, "ray": {"num_cpus": 2},
    })
    try:
        audit_pipeline(config)
    finally:
        ray.shutdown()
    wds_config = parse_audit_config({
        "inputs": [{"kind": "webdataset", "uris": [str(tmp_path / "demo" / "{shards,rejects}" / "*.tar")],
                    "roles": roles, "recipe_field": "json:recipe"}],
        "scorers": scorers, "output": {"uri": str(tmp_path / "wds")},
    })
    audit_pipeline(wds_config, inline=True, report=False)

    source = _manifest(tmp_path / "demo").set_index("key")
    assert (source.status != mf.FAILED).all() and len(source) > 10
    score_columns = [c for c in source.columns if c.startswith(mf.SCORE_PREFIX)]
    for folder in ("audit", "wds"):
        audited = _manifest(tmp_path / folder)
        audited["source_key"] = [json.loads(x)["content"]["source"]["uri"].rsplit("#", 1)[1].split(".")[0]
                                 for x in audited.lineage]
        audited = audited.set_index("source_key").loc[source.index]
        assert len(audited) == len(source) and (audited.status != mf.FAILED).all()
        assert list(audited.recipe) == list(source.recipe)
        assert list(audited.content_sha256) == list(source.content_sha256)  # re-encoded to the same bytes
        assert list(audited.target_sha256) == list(source.target_sha256)
        for column in score_columns:
            np.testing.assert_allclose(audited[column], source[column], rtol=1e-5, atol=1e-6, err_msg=column)
        if folder == "audit":  # the same filters give the same verdicts (generation inheritance aside)
            inherited = source.reasons.map(lambda r: any(x.startswith("parent ") for x in r))
            assert list(audited.status[~inherited]) == list(source.status[~inherited])
    assert (tmp_path / "audit" / mf.REPORT_FILE).exists()
    # The demo and its audit side by side.
    result = CliRunner().invoke(app, ["report", str(tmp_path / "demo"), str(tmp_path / "audit"),
                                      "--out", str(tmp_path / "compare.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "compare.html").read_text()
    assert "Datasets compared" in page and "score.effnet.content_cos" in page and "run: " in page
