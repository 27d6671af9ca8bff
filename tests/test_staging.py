"""Weights at remote URLs are copied once per node into the local cache, under a file lock, with a marker."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from styledistill.generation.telestyle import resolve_model
from styledistill.io import staging
from styledistill.io.staging import COMPLETE_MARKER, is_remote, local_copy, staged
from styledistill.scoring.dino import DinoScorer


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(staging.CACHE_ENV, str(root))
    return root


@pytest.fixture
def remote():
    """A fresh folder on fsspec's in-process memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    base = f"memory://weights-{uuid.uuid4().hex}"
    yield fs, base
    if fs.exists(base):
        fs.rm(base, recursive=True)


@pytest.fixture
def copies(monkeypatch):
    """Counts files fetched from the memory filesystem, each fetch slowed so racing callers overlap."""
    fetched = []
    original = MemoryFileSystem.get_file

    def slow_get_file(self, rpath, lpath, **kwargs):
        fetched.append(rpath)
        time.sleep(0.2)
        return original(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "get_file", slow_get_file)
    return fetched


def test_remote_file_is_copied_once_into_the_cache(remote, cache, copies):
    fs, base = remote
    fs.pipe(f"{base}/lora/telestyle.safetensors", b"weights-v1")
    uri = f"{base}/lora/telestyle.safetensors"
    path = local_copy(uri, "LoRA")
    assert path.name == "telestyle.safetensors" and path.read_bytes() == b"weights-v1"
    assert path.is_relative_to(cache) and (path.parent / COMPLETE_MARKER).is_file()
    assert local_copy(uri, "LoRA") == path
    assert len(copies) == 1


def test_remote_folder_keeps_its_layout(remote, copies):
    fs, base = remote
    fs.pipe({f"{base}/pipe/model_index.json": b"{}", f"{base}/pipe/vae/config.json": b"{\"z\": 4}"})
    folder = local_copy(f"{base}/pipe/", "TeleStyle model")
    assert folder.name == "pipe"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "model_index.json", "vae/config.json"]
    assert (folder / "vae" / "config.json").read_bytes() == b"{\"z\": 4}"


def test_racing_threads_copy_once(remote, copies):
    fs, base = remote
    fs.pipe(f"{base}/clip.pt", b"x" * 1000)
    results, errors = [], []

    def fetch():
        try:
            results.append(local_copy(f"{base}/clip.pt", "CLIP"))
        except Exception as err:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(copies) == 1
    assert results[0] == results[1] and results[0].read_bytes() == b"x" * 1000


def test_a_half_copy_is_redone(remote, copies):
    fs, base = remote
    fs.pipe({f"{base}/dino/config.json": b"{}", f"{base}/dino/model.safetensors": b"full weights"})
    uri = f"{base}/dino"
    folder = local_copy(uri, "DINOv2")
    (folder.parent / COMPLETE_MARKER).unlink()  # as if the copying actor had died before finishing
    (folder / "model.safetensors").write_bytes(b"fu")
    (folder / "stale.bin").write_bytes(b"left over")
    assert local_copy(uri, "DINOv2") == folder
    assert (folder / "model.safetensors").read_bytes() == b"full weights"
    assert not (folder / "stale.bin").exists()
    assert len(copies) == 4


def test_local_paths_and_hub_ids_are_not_copied(tmp_path, cache):
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"w")
    assert not is_remote(str(weights)) and not is_remote(f"file://{weights}")
    assert local_copy(str(weights), "CLIP") == weights
    assert local_copy(f"file://{weights}", "CLIP") == weights
    assert staged("Qwen/Qwen-Image-Edit-2509", "TeleStyle model") == "Qwen/Qwen-Image-Edit-2509"
    assert is_remote("s3://bucket/weights/telestyle.safetensors") and is_remote("gs://b/x")
    assert not cache.exists()


def test_missing_remote_weights_name_what_and_where(remote):
    _, base = remote
    with pytest.raises(FileNotFoundError, match=f"CSD: weights not found at {base}/csd.bin"):
        local_copy(f"{base}/csd.bin", "CSD")


def test_backends_resolve_remote_weights_through_the_cache(tmp_path, remote, cache, tiny_dino_dir):
    fs, base = remote
    for path in Path(tiny_dino_dir).iterdir():
        fs.pipe(f"{base}/tiny-dinov2/{path.name}", path.read_bytes())
    scorer = DinoScorer({"model": f"{base}/tiny-dinov2", "batch_size": 2})
    scorer.setup()
    [embedding] = scorer.embed([np.zeros((40, 40, 3), np.uint8)])
    assert embedding.shape == (32,)
    assert scorer.model_info()["dino_model"] == f"{base}/tiny-dinov2"  # the origin, not the cache path

    fs.pipe(f"{base}/qwen-edit/model_index.json", b"{}")
    folder, revision = resolve_model(f"{base}/qwen-edit")
    assert folder.is_relative_to(cache) and (folder / "model_index.json").is_file() and revision is None
