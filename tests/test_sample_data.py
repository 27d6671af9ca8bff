import os

import pyarrow.parquet as pq

from styledistill.tools.sample_data import build_sample_data
from styledistill.pipeline.scan import scan_sources
from styledistill.schemas.config import RunConfig


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sample_data_is_deterministic_and_scans(tmp_path):
    counts = build_sample_data(tmp_path / "a")
    assert counts == {"realistic": 9, "stylized": 12, "bad": 2}
    assert build_sample_data(tmp_path / "a") == counts  # already built: skipped
    assert build_sample_data(tmp_path / "b") == counts
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # byte-identical rebuild

    sample = tmp_path / "a"
    config = RunConfig(
        sources=[
            {"uri": str(sample / "realistic"), "label": "realistic"},
            {"uri": str(sample / "stylized"), "label": "stylized"},
        ]
    )
    kept = scan_sources(config, str(tmp_path / "run"))
    # Every real picture and every style reference is valid and distinct (no pHash near-duplicates).
    assert sum(k.label == "realistic" for k in kept) == 9
    assert sum(k.label == "stylized" for k in kept) == 12
    rows = pq.read_table(tmp_path / "run" / "sources.parquet").to_pandas()
    failed = rows[rows["status"] == "failed"]
    assert sorted(failed["uri"].map(os.path.basename)) == ["empty.jpg", "truncated.jpg"]
    assert set(failed["error"].str.split(":").str[0]) == {"empty file (0 bytes)", "truncated or corrupt"}
