"""A generator for benchmarks only, never a quality model: it sleeps a fixed time per image and returns the
content image unchanged.

It stands in for a GPU model whose latency is known (`latency_s` per image, `setup_s` to load) but costs no CPU,
so a benchmark with it measures the executor (dispatch, object passing, scaling across nodes), not the
cores of the machine it runs on. Deterministic by construction: the output is the content image.
"""

from __future__ import annotations

import time

import numpy as np
from pydantic import Field

from styledistill.backends import BackendOptions
from styledistill.generation.base import GenerationRequest, Generator


class SleepGenerator(Generator):
    name = "benchmark_sleep"

    class Options(BackendOptions):
        latency_s: float = Field(0.1, ge=0.0, le=600.0)  # seconds slept per image
        setup_s: float = Field(0.0, ge=0.0, le=600.0)  # seconds setup sleeps, as a real model loads its weights

    def setup(self) -> None:
        time.sleep(self.options.setup_s)

    def generate(self, requests: list[GenerationRequest]) -> list[np.ndarray | Exception]:
        outputs: list[np.ndarray | Exception] = []
        for request in requests:
            if self.options.latency_s:
                time.sleep(self.options.latency_s)
            content = request.content
            if content.ndim != 3 or content.shape[2] != 3 or not content.shape[0] or not content.shape[1]:
                outputs.append(ValueError(f"content image of shape {content.shape}: expected HxWx3, H, W > 0"))
                continue
            outputs.append(np.ascontiguousarray(content, dtype=np.uint8))
        return outputs

    def model_info(self) -> dict[str, str]:
        return {"backend": "benchmark_sleep", "latency_s": str(self.options.latency_s),
                "note": "benchmark backend: returns the content image unchanged"}
