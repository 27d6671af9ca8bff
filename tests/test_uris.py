import uuid

import pytest

from styledistill.io import uris


@pytest.fixture(params=["local", "file", "memory"])
def base(request, tmp_path):
    """The same tests against a plain path, a file:// URL and an in-memory object store."""
    if request.param == "local":
        return str(tmp_path)
    if request.param == "file":
        return f"file://{tmp_path}"
    return f"memory://uris-test-{uuid.uuid4().hex}"


def test_write_read_exists(base):
    target = uris.join(base, "a", "b", "data.bin")
    assert not uris.exists(target)
    uris.write_bytes_atomic(target, b"\x00\x01payload")
    assert uris.exists(target)
    assert uris.read_bytes(target) == b"\x00\x01payload"
    assert uris.read_bytes(target, max_bytes=3) == b"\x00\x01p"
    uris.write_text_atomic(target, "replaced ü")
    assert uris.read_bytes(target).decode("utf-8") == "replaced ü"
    # No temp file is left beside the target.
    assert uris.listdir(uris.join(base, "a", "b")) == ["data.bin"]


def test_atomic_stream_removes_temp_on_error(base):
    target = uris.join(base, "shard.tar")
    with uris.open_for_write_atomic(target) as f:
        f.write(b"complete")
    with pytest.raises(RuntimeError):
        with uris.open_for_write_atomic(target) as f:
            f.write(b"half")
            raise RuntimeError("crash mid-write")
    # The earlier complete file is untouched and the failed temp file is gone.
    assert uris.read_bytes(target) == b"complete"
    assert uris.listdir(base) == ["shard.tar"]


def test_listdir_find_glob(base):
    for name in ["x/1.jpg", "x/2.png", "x/sub/3.jpg", "y.txt"]:
        uris.write_bytes_atomic(uris.join(base, *name.split("/")), b"1")
    uris.makedirs(uris.join(base, "empty"))
    assert uris.is_dir(uris.join(base, "x"))
    assert uris.listdir(uris.join(base, "x")) == ["1.jpg", "2.png", "sub"]
    found = uris.find_files(uris.join(base, "x"))
    assert [f.rsplit("/", 1)[1] for f in found] == ["1.jpg", "2.png", "3.jpg"]
    matched = uris.glob(uris.join(base, "x", "**", "*.jpg"))
    assert [m.rsplit("/", 1)[1] for m in matched] == ["1.jpg", "3.jpg"]
    # Results keep the caller's form: a URL in, URLs out (and readable as such).
    assert all(("://" in m) == ("://" in base) for m in matched + found)
    assert uris.read_bytes(matched[0]) == b"1"


def test_join_and_parent():
    assert uris.join("s3://bucket/run/", "shards", "a.tar") == "s3://bucket/run/shards/a.tar"
    assert uris.join("/data/run", "shards", "a.tar") == "/data/run/shards/a.tar"
    assert uris.parent("s3://bucket/run/m.parquet") == "s3://bucket/run"
    assert uris.parent("/data/m.csv") == "/data"


def test_missing_file_raises(base):
    with pytest.raises(FileNotFoundError):
        uris.read_bytes(uris.join(base, "missing.bin"))
