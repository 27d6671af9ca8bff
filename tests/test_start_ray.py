"""How a run finds its Ray, without starting one: the arguments `start_ray` gives `ray.init`."""

from __future__ import annotations

import pytest

from styledistill.pipeline import run
from styledistill.schemas.config import parse_config


@pytest.fixture
def init_calls(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def _config(**ray_options):
    return parse_config({"sources": [{"uri": "x", "label": "realistic"}], "ray": ray_options})


@pytest.mark.parametrize("env", [None, "local"])
def test_without_an_address_a_private_local_ray_is_sized_for_every_stage(init_calls, monkeypatch, env):
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)  # "local" asks for the same private Ray, sized
    run.start_ray(_config(), None)
    [kwargs] = init_calls
    assert kwargs["address"] == "local" and kwargs["num_cpus"] >= 3  # load + generate + score + encode + write


@pytest.mark.parametrize("how", ["flag", "config", "env"])
def test_an_address_joins_that_cluster_without_sizing_it(init_calls, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    run.start_ray(_config(**({"address": "10.0.0.1:6379"} if how == "config" else {})),
                  "10.0.0.1:6379" if how == "flag" else None)
    [kwargs] = init_calls
    assert kwargs["address"] == "10.0.0.1:6379" and "num_cpus" not in kwargs
