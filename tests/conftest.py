"""Shared fixtures: the bundled sample set (built once per session) and demo configs pointing at it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from styledistill.tools.sample_data import build_sample_data
from styledistill.schemas.config import RunConfig, load_config

DEMO_CONFIG = Path(str(resources.files("styledistill") / "configs" / "demo.yaml"))


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "sample-data"
    build_sample_data(out, with_bad_files=True)
    return out


def demo_config(sample_data: Path, out: Path, *overrides: str) -> RunConfig:
    """The packaged demo config on the sample set, small: 4 photos, shards of 6 samples."""
    return load_config(DEMO_CONFIG, [
        f"sources.0.uri={sample_data / 'realistic'}",
        f"sources.1.uri={sample_data / 'stylized'}",
        f"output.uri={out}",
        "plan.max_photos=4",
        "plan.samples_per_shard=6",
        *overrides,
    ])
