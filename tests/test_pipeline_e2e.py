"""End to end on the embedded models: the demo config, small, through local Ray and inline."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from conftest import demo_config
from styledistill.pipeline import images
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas import manifest as mf
from styledistill.schemas.config import ConfigError

pytestmark = pytest.mark.slow  # the demo pipeline, end to end

def read_manifests(run: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((run / mf.SHARDS_DIR).glob("*.parquet"))],
                     ignore_index=True)


def read_tars(run: Path) -> dict[str, dict]:
    urls = [str(p) for p in sorted((run / mf.SHARDS_DIR).glob("*.tar"))]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def run_files(run: Path) -> dict[str, bytes]:
    """Every dataset file of a run, by relative path (run.json, metrics and the report hold times)."""
    skip = {mf.RUN_FILE, mf.METRICS_FILE, mf.SUMMARY_FILE, mf.REPORT_FILE}
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def ray_run(sample_data, tmp_path_factory, local_ray) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "run"
    outcome = run_pipeline(demo_config(sample_data, out, "output.write_rejects=true"))
    assert outcome.shards >= 2
    return out


def test_every_planned_sample_has_a_decision(ray_run):
    df = read_manifests(ray_run)
    assert len(df) == 4 * 4  # 4 photos x triplets_per_photo
    assert set(df.status) <= {mf.ACCEPTED, mf.REJECTED, mf.FAILED}
    assert df.key.is_unique
    assert not df.key.str.contains(r"\.").any()
    rejected = df[df.status == mf.REJECTED]
    assert all(len(r) > 0 for r in rejected.reasons)  # every rejection names its rules
    assert {c for c in df.columns if c.startswith(mf.SCORE_PREFIX)} >= {
        "score.effnet.content_cos", "score.edges.ssim", "score.magenta.style_cos", "score.gram.distance",
        "score.noop.pixel_diff", "score.nsfw.prob", "score.effnet.leakage"}
    assert df[[c for c in df.columns if c.startswith(mf.SCORE_PREFIX)]].notna().all().all()


def test_tars_hold_exactly_the_accepted_samples(ray_run):
    df = read_manifests(ray_run)
    samples = read_tars(ray_run)
    assert set(samples) == set(df.key[df.status == mf.ACCEPTED])
    for key, sample in samples.items():
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"content.png", "style.png", "target.png",
                                                                            "txt", "json"}
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["status"] == mf.ACCEPTED
        assert sample["txt"].decode().startswith("Style Transfer the style of Figure 2 to Figure 1")
        assert meta["config_hash"] and meta["models"]["generator.magenta"]["backend"] == "magenta"
        assert {f"scorer.{name}" for name in ("effnet", "edges", "magenta", "gram", "noop", "nsfw")} <= set(meta["models"])
    rejects = [str(p) for p in sorted((ray_run / mf.REJECTS_DIR).glob("*.tar"))]
    rejected_keys = {s["__key__"] for s in wds.WebDataset(rejects, shardshuffle=False)}
    assert rejected_keys == set(df.key[df.status == mf.REJECTED])


def test_recipe_structure(ray_run, sample_data):
    df = read_manifests(ray_run).set_index("key")
    samples = {**read_tars(ray_run), **{s["__key__"]: s for s in wds.WebDataset(
        [str(p) for p in sorted((ray_run / mf.REJECTS_DIR).glob("*.tar"))], shardshuffle=False)}}
    assert set(df.recipe) == {"rns", "sns", "snr", "rnr"}
    config = demo_config(sample_data, ray_run)
    for key, sample in samples.items():
        row = df.loc[key]
        lineage = json.loads(row.lineage)
        content, style, target = (lineage[r] for r in ("content", "style", "target"))
        if row.recipe == "rnr":  # (c, p, c)
            assert sample["target.png"] == sample["content.png"]
            assert style["source"]["label"] == "realistic" and style["source"]["uri"] != content["source"]["uri"]
        if row.recipe == "snr":  # (r_i, p, c): the target is the original photo, as the generator saw it
            photo = images.load_image(target["source"]["uri"], config.decode).array
            expected = images.prepare_content(photo, config.resolution)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["target.png"]))), expected)
            assert content["generation"]["content"]["source"]["uri"] == target["source"]["uri"]
            assert style["source"]["label"] == "realistic" and style["source"]["uri"] != target["source"]["uri"]
        if row.recipe == "sns":  # (r_j, s_i, r_i): another V1 output of the same photo
            gen_c, gen_t = content["generation"], target["generation"]
            assert gen_c["content"]["source"]["sha256"] == gen_t["content"]["source"]["sha256"]
            assert gen_c["gen_id"] != gen_t["gen_id"]
            assert gen_t["style"]["source"]["sha256"] == style["source"]["sha256"]
        if row.recipe == "rns":  # (c, s_i, r_i)
            assert target["generation"]["content"]["source"]["sha256"] == content["source"]["sha256"]
            assert target["generation"]["style"]["source"]["sha256"] == style["source"]["sha256"]


def test_indexes_and_readers(ray_run):
    import wids

    df = read_manifests(ray_run)
    stats = [json.loads(p.read_text()) for p in sorted((ray_run / mf.SHARDS_DIR).glob("*_stats.json"))]
    assert [s["shard"] for s in stats] == list(range(len(stats)))  # gapless
    assert sum(s["planned"] for s in stats) == len(df)
    sizes = json.loads((ray_run / mf.SHARDS_DIR / mf.SIZES_FILE).read_text())
    assert list(sizes) == [f"styledistill-{i:06d}.tar" for i in range(len(stats))]
    assert sum(sizes.values()) == (df.status == mf.ACCEPTED).sum()
    dataset = wids.ShardListDataset(str(ray_run / mf.WIDS_INDEX_FILE))
    assert len(dataset) == sum(sizes.values())
    first = dataset[0]
    assert first["__key__"] in set(df.key) and ".target.png" in first


def test_ray_data_reads_the_shards(ray_run, local_ray):
    import ray.data

    ds = ray.data.read_webdataset(str(ray_run / mf.SHARDS_DIR), file_extensions=["tar"], decoder=None)
    rows = ds.take_all()
    assert {r["__key__"] for r in rows} == set(read_tars(ray_run))


def test_hf_datasets_reads_the_shards(ray_run, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # HF datasets cannot read an empty tar (a shard where every sample was rejected): sizes.json says which.
    sizes = json.loads((ray_run / mf.SHARDS_DIR / mf.SIZES_FILE).read_text())
    files = [str(ray_run / mf.SHARDS_DIR / name) for name, count in sizes.items() if count]
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                               cache_dir=str(ray_run.parent / "hf-cache"))
    assert sorted(ds["__key__"]) == sorted(read_tars(ray_run))
    assert {"content.png", "style.png", "target.png", "txt", "json"} <= set(ds.column_names)


def test_report_and_summary(ray_run):
    summary = json.loads((ray_run / mf.SUMMARY_FILE).read_text())
    df = read_manifests(ray_run)
    html = (ray_run / mf.REPORT_FILE).read_text()
    assert "<svg" in html and "data:image/jpeg;base64," in html
    assert json.dumps(summary).count(str((df.status == mf.ACCEPTED).sum())) >= 1
    sources = pd.read_parquet(ray_run / mf.SOURCES_FILE)
    bad = sources[sources.status == "failed"].set_index(sources[sources.status == "failed"].uri.str.rsplit("/").str[-1])
    assert "empty" in bad.loc["empty.jpg", "error"]  # bad inputs recorded with a reason, the run went on
    assert "truncated" in bad.loc["truncated.jpg", "error"].lower() or "corrupt" in bad.loc["truncated.jpg", "error"]


def test_inline_run_is_byte_identical_to_ray_run(ray_run, sample_data, tmp_path):
    """Determinism across executors, batching and actor placement: same keys, decisions and bytes."""
    out = tmp_path / "inline"
    run_pipeline(demo_config(sample_data, out, "output.write_rejects=true", "ray.groups_per_batch=1"),
                 inline=True)
    assert run_files(out).keys() == run_files(ray_run).keys()
    for name, data in run_files(out).items():
        if name.endswith(".parquet") or name.endswith(".tar") or name.endswith("sizes.json"):
            assert data == run_files(ray_run)[name], name


def test_rerun_of_a_finished_run_writes_nothing(ray_run, sample_data):
    before = {p: p.stat().st_mtime_ns for p in (ray_run / mf.SHARDS_DIR).glob("*.tar")}
    outcome = run_pipeline(demo_config(sample_data, ray_run, "output.write_rejects=true"), inline=True)
    assert outcome.skipped_shards == outcome.shards and not outcome.written
    assert before == {p: p.stat().st_mtime_ns for p in (ray_run / mf.SHARDS_DIR).glob("*.tar")}


def test_another_config_on_the_same_run_folder_is_refused(ray_run, sample_data):
    with pytest.raises(ConfigError, match="another config"):
        run_pipeline(demo_config(sample_data, ray_run, "output.write_rejects=true", "plan.seed=7"), inline=True)


def test_source_deleted_after_the_scan_fails_its_samples_with_the_reason(sample_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    config = demo_config(data, tmp_path / "run", "plan.max_photos=2")
    from styledistill.pipeline.scan import scan_sources

    scan_sources(config, str(tmp_path / "run"))
    (data / "realistic" / "astronaut.jpg").unlink()  # first photo in scan order
    run_pipeline(config, inline=True, report=False)
    df = read_manifests(tmp_path / "run")
    lost = df[df.lineage.str.contains("astronaut.jpg")]
    assert len(lost) and (lost.status == mf.FAILED).all()
    assert lost.error.str.contains("file not found").all()
    assert (df[~df.lineage.str.contains("astronaut.jpg")].status != mf.FAILED).all()


def test_sources_and_outputs_in_an_object_store(sample_data):
    """The same run with every input and output behind an fsspec URL (memory:// stands in for s3://)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in sorted(sample_data.rglob("*.jpg")):
        fs.pipe(f"/bucket/pool/{path.parent.name}/{path.name}", path.read_bytes())
    config = demo_config(sample_data, Path("unused"), "plan.max_photos=2",
                         "sources.0.uri=memory://bucket/pool/realistic", "sources.1.uri=memory://bucket/pool/stylized",
                         "output.uri=memory://bucket/runs/demo")
    try:
        outcome = run_pipeline(config, inline=True)  # inline: memory:// is per process
        names = {p.rsplit("/", 1)[-1] for p in fs.find("/bucket/runs/demo")}
        assert {"run.json", "sources.parquet", "wids-index.json", "report.html", "summary.json", "sizes.json",
                "styledistill-000000.tar", "styledistill-000000.parquet", "styledistill-000000_stats.json"} <= names
        with fs.open("/bucket/runs/demo/shards/styledistill-000000.parquet") as f:
            manifest = pd.read_parquet(f)
        assert sum(outcome.counts.values()) == 8 and manifest.lineage.str.contains("memory:///bucket/pool/").all()
    finally:
        fs.rm("/bucket", recursive=True)
