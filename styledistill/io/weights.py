"""Finding model weights offline, and the small torch helpers the model scorers share.

Nothing here downloads from the hub: a weight is a local file or directory, a remote URL (s3://, gs://) copied
once per node by `io.staging`, or a Hugging Face repo id that must already be in the local cache. We never hand a repo id to `from_pretrained` directly, because transformers 5.x still
sends HEAD requests (and retries for ~20 s) with `local_files_only=True`; resolving the id to a cached
snapshot first keeps every load off the network, with or without HF_HUB_OFFLINE.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from styledistill.io.staging import staged

DType = Literal["float32", "float16", "bfloat16"]
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors", ".npz")

T = TypeVar("T")


def torch_dtype(name: DType):
    """The torch dtype a config names; torch is imported here, not by a driver that only checks options."""
    import torch

    return getattr(torch, name)


def looks_like_path(name: str) -> bool:
    """A Hugging Face repo id is `org/name`; anything else (absolute, relative, a weights file) is a path."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") != 1 or name.endswith(WEIGHT_SUFFIXES)


def local_file(path: str, what: str) -> Path:
    resolved = Path(staged(path, what)).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"{what}: weights file not found: {resolved}")
    return resolved


def cached_hf_file(repo_id: str, filename: str, what: str) -> Path:
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{what}: {repo_id}/{filename} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            "downloads are disabled: fetch it beforehand or give a local path"
        ) from None


def weights_file(name: str, default_filename: str, what: str) -> Path:
    """`name` is a local weights file, or a repo id whose `default_filename` is in the local HF cache."""
    if looks_like_path(name) or Path(name).expanduser().is_file():
        return local_file(name, what)
    return cached_hf_file(name, default_filename, what)


def model_dir(name: str, what: str) -> Path:
    """`name` is a local model directory (save_pretrained layout), a remote URL of one (copied to the node's
    cache), or a repo id in the local HF cache."""
    return model_dir_revision(name, what)[0]


def model_dir_revision(name: str, what: str) -> tuple[Path, str | None]:
    """`model_dir`, with the cache revision that answered: the snapshot commit for a cached repo id, None for a
    local directory or a remote URL."""
    name = staged(name, what)
    resolved = Path(name).expanduser()
    if resolved.is_dir():
        return resolved, None
    if looks_like_path(name):
        raise FileNotFoundError(f"{what}: model directory not found: {resolved}")
    try:
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{what}: model {name!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"downloads are disabled: fetch it beforehand (`hf download {name}`) or give a local directory"
        ) from None
    return snapshot, snapshot.name  # snapshots/<commit>


def sha256_files(paths: Sequence[Path]) -> str:
    """One digest over the given files in order (weights are hashed once per actor, at setup)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
