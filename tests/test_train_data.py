import itertools
import logging

from tiny_train_models import INSTRUCTION, write_run

from styledistill.jobs.train.config import DataConfig
from styledistill.jobs.train.data import TripletLoader, fit_to_area


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_fit_to_area_keeps_aspect_and_multiples():
    assert fit_to_area(2000, 1000, 512 * 512, 16) == (720, 368)
    w, h = fit_to_area(1024, 1024, 1024 * 1024, 32)
    assert (w, h) == (1024, 1024)


def test_keys_shapes_and_only_accepted(tmp_path):
    run = write_run(tmp_path / "run", shards=2, per_shard=3, rejected_every=3, size=(64, 48))
    loader = TripletLoader(DataConfig(run=str(run), area=64 * 48, shuffle_buffer=2))
    items = _take(loader, 8)  # two epochs of the 4 accepted samples
    keys = {it["key"] for it in items}
    assert keys == {"s0k1", "s0k2", "s1k1", "s1k2"}  # s0k0, s1k0 are "rejected"
    assert set(loader.skipped) == {"not_accepted"} and loader.skipped["not_accepted"] >= 2
    item = items[0]
    assert item["target"].shape == item["content"].shape == (3, 48, 64)
    assert item["style"].shape == (3, 48, 48)
    assert -1.0 <= float(item["target"].min()) and float(item["target"].max()) <= 1.0
    # The stored .txt is the writer's final instruction (enhancer words already appended): used as is.
    assert item["instruction"] == INSTRUCTION and item["recipe"] == "rns"


def test_ranks_read_disjoint_shards(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", shards=4, per_shard=2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = TripletLoader(DataConfig(run=str(run), area=32 * 32, shuffle_buffer=0))
        seen.append({it["key"] for it in _take(loader, 4)})  # one epoch: 2 shards x 2 samples
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]
    assert {k[:2] for k in seen[0]}.isdisjoint({k[:2] for k in seen[1]})  # whole shards per rank


def test_corrupt_sample_and_shard_are_counted_not_fatal(tmp_path, caplog):
    run = write_run(tmp_path / "run", shards=2, per_shard=3, corrupt_keys=("s1k2",))
    (run / "shards" / "test-000002.tar").write_bytes(b"\x00garbage" * 100)
    loader = TripletLoader(DataConfig(run=str(run), area=32 * 32, shuffle_buffer=0))
    with caplog.at_level(logging.WARNING):
        keys = [it["key"] for it in _take(loader, 10)]  # two epochs of 5 good samples
    assert "s1k2" not in keys and len(set(keys)) == 5
    assert loader.skipped["decode_error"] == 2 and loader.skipped["read_error"] >= 2
    assert any("skipped (decode_error" in r.message for r in caplog.records)


def test_wids_resume_is_exact(tmp_path):
    run = write_run(tmp_path / "run", shards=2, per_shard=3)
    cfg = DataConfig(run=str(run), area=32 * 32, use_wids=True)
    first = TripletLoader(cfg)
    keys = [it["key"] for it in _take(first, 9)]  # crosses an epoch boundary (6 samples)
    assert sorted(keys[:6]) == sorted(f"s{s}k{i}" for s in range(2) for i in range(3))
    resumed = TripletLoader(cfg, consumed=4)
    assert [it["key"] for it in _take(resumed, 5)] == keys[4:]
    # Two ranks split each epoch's permutation.
    a, b = TripletLoader(cfg, rank=0, world=2), TripletLoader(cfg, rank=1, world=2)
    assert not {it["key"] for it in _take(a, 3)} & {it["key"] for it in _take(b, 3)}


def test_reads_a_run_folder_in_an_object_store(tmp_path):
    """Shards where the pipeline wrote them: fsspec URLs (memory:// stands in for s3://)."""
    import fsspec

    run = write_run(tmp_path / "run", shards=2, per_shard=3, rejected_every=3)
    fs = fsspec.filesystem("memory")
    for path in sorted(run.rglob("*")):
        if path.is_file():
            fs.pipe(f"/train-bucket/run/{path.relative_to(run)}", path.read_bytes())
    try:
        loader = TripletLoader(DataConfig(run="memory://train-bucket/run", area=32 * 32, shuffle_buffer=0,
                                          num_workers=0))
        assert {it["key"] for it in _take(loader, 4)} == {"s0k1", "s0k2", "s1k1", "s1k2"}
    finally:
        fs.rm("/train-bucket", recursive=True)
