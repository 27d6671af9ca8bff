"""Training triplets from a run folder's webdataset shards.

Each sample of `<run>/shards/*.tar` has the members `<key>.content.<ext>`, `<key>.style.<ext>`,
`<key>.target.<ext>`, `<key>.txt` (the final instruction, used as is) and `<key>.json` (metadata), see
schemas/manifest.py.
The loader yields one decoded sample at a time: images are resized to about `area` pixels keeping their
aspect ratio, so samples differ in size and the trainers batch by gradient accumulation.

Two readers:
- streaming (webdataset): shards shuffled per epoch, split by node (rank) then by DataLoader worker,
  shuffle buffer. Resuming restarts the stream with a seed moved by the samples already consumed.
- random access (wids, `data.use_wids`): a seeded permutation per epoch over the run's `wids-index.json`,
  strided by rank; resuming skips exactly the consumed samples.

Bad input never stops training: unreadable shards, undecodable samples and non-accepted samples are
skipped, counted by reason and logged.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from styledistill.jobs.train.config import DataConfig
from styledistill.io import uris
from styledistill.schemas.manifest import (
    ACCEPTED,
    CONTENT_MEMBER,
    META_MEMBER,
    SHARDS_DIR,
    STYLE_MEMBER,
    TARGET_MEMBER,
    TEXT_MEMBER,
    WIDS_INDEX_FILE,
)

logger = logging.getLogger(__name__)

IMAGE_MEMBERS = (CONTENT_MEMBER, STYLE_MEMBER, TARGET_MEMBER)


class SkipSample(Exception):
    """A sample that is readable but must not be trained on; `reason` is the counter's key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def fit_to_area(width: int, height: int, area: int, multiple_of: int) -> tuple[int, int]:
    """Size with about `area` pixels and the same aspect ratio, sides multiples of `multiple_of`."""
    ratio = width / height
    new_w = max(multiple_of, round(math.sqrt(area * ratio) / multiple_of) * multiple_of)
    new_h = max(multiple_of, round(math.sqrt(area / ratio) / multiple_of) * multiple_of)
    return new_w, new_h


def _to_tensor(image: Image.Image, area: int, multiple_of: int) -> torch.Tensor:
    size = fit_to_area(*image.size, area, multiple_of)
    image = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # the VAE expects [-1, 1]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def decode_triplet(sample: dict, cfg: DataConfig) -> dict:
    """Raw tar members of one sample to tensors and text; raises SkipSample or decoding errors."""
    members = {k.lstrip("."): v for k, v in sample.items() if not k.startswith("__")}
    meta = json.loads(members[META_MEMBER])
    if meta.get("status") != ACCEPTED:
        raise SkipSample("not_accepted", f"status {meta.get('status')!r}")
    out = {"key": sample["__key__"], "recipe": meta.get("recipe")}
    for role in IMAGE_MEMBERS:
        data = next((v for k, v in members.items() if k.split(".")[0] == role), None)
        if data is None:
            raise SkipSample("missing_member", role)
        with Image.open(io.BytesIO(data)) as image:
            out[role] = _to_tensor(image, cfg.area, cfg.multiple_of)
    # The writer stores the final instruction (with the enhancer's words when the run appended them).
    out["instruction"] = members[TEXT_MEMBER].decode("utf-8")
    return out


def _read_bytes(sample: dict) -> dict:
    # wids hands out file objects; the tar reader hands out bytes.
    return {k: v.read() if hasattr(v, "read") else v for k, v in sample.items()}


class SkipCounter:
    """Counts skipped input by reason and logs each skip; used as a webdataset exception handler."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, detail: object) -> None:
        self.counts[reason] += 1
        logger.warning("skipped (%s, %d so far): %s", reason, self.counts[reason], detail)

    def handler(self, exn: Exception) -> bool:
        self.add("read_error", repr(exn))
        return True  # keep going


def _worker_id() -> tuple[int, int]:
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return rank, worker


def run_shards(run: str) -> list[str]:
    """The run's shard tars, local or in an object store (s3://, gs://, ...)."""
    urls = uris.glob(uris.join(str(run), SHARDS_DIR, "*.tar"))
    if not urls:
        raise FileNotFoundError(f"no shards under {uris.join(str(run), SHARDS_DIR)}")
    return urls


def _opened_with_fsspec(sources: Iterator[dict], handler) -> Iterator[dict]:
    """webdataset's url_opener, through fsspec, so shards can live wherever the pipeline wrote them."""
    for source in sources:
        try:
            yield {**source, "stream": uris.open_for_read(source["url"])}
        except Exception as exn:  # noqa: BLE001 - the handler decides: count and skip the shard, or raise
            exn.args = exn.args + (source["url"],)
            if not handler(exn):
                break


def _fsspec_tar_samples(sources: Iterator[dict], handler) -> Iterator[dict]:
    files = wds.tariterators.tar_file_expander(_opened_with_fsspec(sources, handler), handler=handler)
    return wds.tariterators.group_by_keys(files, handler=handler)


fsspec_tarfile_to_samples = wds.filters.pipelinefilter(_fsspec_tar_samples)


class StreamingTriplets(torch.utils.data.IterableDataset):
    """Endless webdataset stream of decoded triplets for this rank and DataLoader worker."""

    def __init__(self, urls: list[str], cfg: DataConfig, seed: int):
        self.urls, self.cfg, self.seed = urls, cfg, seed
        self.skips = SkipCounter()

    def _decoded(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            try:
                item = decode_triplet(sample, self.cfg)
            except SkipSample as skip:
                self.skips.add(skip.reason, sample.get("__key__"))
                continue
            except Exception as err:  # corrupt image bytes, bad JSON, missing members
                self.skips.add("decode_error", f"{sample.get('__key__')}: {err!r}")
                continue
            # Workers live in other processes: each sample carries its worker's running counts.
            item["skips"] = (_worker_id(), dict(self.skips.counts))
            yield item

    def __iter__(self) -> Iterator[dict]:
        for epoch in itertools.count():
            rng = random.Random(self.seed + epoch)
            urls = list(self.urls)
            rng.shuffle(urls)  # same order on every rank, so the node split stays disjoint
            pipeline = wds.DataPipeline(
                wds.SimpleShardList(urls),
                wds.split_by_node,
                wds.split_by_worker,
                fsspec_tarfile_to_samples(handler=self.skips.handler),
                wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng)
                if self.cfg.shuffle_buffer
                else wds.filters.identity,
            )
            produced = 0
            for item in self._decoded(iter(pipeline)):
                produced += 1
                yield item
            if produced == 0:
                rank, world, worker, workers = wds.utils.pytorch_worker_info()
                raise RuntimeError(
                    f"rank {rank}/{world} worker {worker}/{workers} got no usable samples from "
                    f"{len(urls)} shards: need at least ranks x workers shards, skipped {dict(self.skips.counts)}"
                )


class RandomAccessTriplets(torch.utils.data.Dataset):
    """The run's samples by index through wids; a bad sample decodes to None (skipped and counted)."""

    def __init__(self, index_file: str | Path, cfg: DataConfig):
        import wids

        self.cfg = cfg
        self.dataset = wids.ShardListDataset(str(index_file), transformations=[_read_bytes])
        self.skips = SkipCounter()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        try:
            item = decode_triplet(self.dataset[index], self.cfg)
        except SkipSample as skip:
            self.skips.add(skip.reason, index)
            return None
        except Exception as err:
            self.skips.add("decode_error", f"index {index}: {err!r}")
            return None
        item["skips"] = (_worker_id(), dict(self.skips.counts))
        return item


class ResumableSampler(torch.utils.data.Sampler):
    """Endless per-epoch permutations, strided by rank, starting after `start` indices of this rank."""

    def __init__(self, size: int, rank: int, world: int, seed: int, start: int = 0):
        self.size, self.rank, self.world, self.seed, self.start = size, rank, world, seed, start

    def __iter__(self) -> Iterator[int]:
        per_rank = len(range(self.rank, self.size, self.world))
        epoch, skip = divmod(self.start, per_rank)
        for epoch in itertools.count(epoch):
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from order[self.rank :: self.world][skip:].tolist()
            skip = 0


class TripletLoader:
    """Iterates decoded triplets for this rank; tracks samples consumed (for resume) and skips."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world: int = 1, consumed: int = 0):
        self.cfg, self.consumed = cfg, consumed
        self._skips: dict[tuple[int, int], dict[str, int]] = {}
        if cfg.use_wids:
            dataset = RandomAccessTriplets(Path(cfg.run) / WIDS_INDEX_FILE, cfg)
            sampler = ResumableSampler(len(dataset), rank, world, cfg.seed, start=consumed)
            # None (a skipped sample) still counts as consumed, so resume stays exact.
            self._loader = torch.utils.data.DataLoader(
                dataset, sampler=sampler, batch_size=None, num_workers=cfg.num_workers, collate_fn=lambda x: x
            )
        else:
            urls = list(cfg.shards) or run_shards(cfg.run)
            urls = [u for pattern in urls for u in wds.shardlists.expand_urls(pattern)]
            dataset = StreamingTriplets(urls, cfg, seed=cfg.seed + consumed)
            self._loader = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=cfg.num_workers, collate_fn=lambda x: x
            )

    @property
    def skipped(self) -> dict[str, int]:
        """Skips so far, summed over this rank's workers."""
        total: Counter[str] = Counter()
        for counts in self._skips.values():
            total.update(counts)
        return dict(total)

    def __iter__(self) -> Iterator[dict]:
        for item in self._loader:
            self.consumed += 1
            if item is None:
                continue
            worker, counts = item.pop("skips")
            self._skips[worker] = counts
            yield item
