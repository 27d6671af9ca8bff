"""Autoscaling actor pools: the policy (pure logic), the config bounds, and one Ray run in which the stage
that backs up grows and an idle one shrinks."""

from __future__ import annotations

import functools

import pytest

from styledistill.pipeline.autoscale import AutoscalePolicy, Decision, PoolState
from styledistill.schemas.stages import StageResources


def pool(stage=0, queued=0, active=1, starting=0, low=1, high=4, saturated=True, batch_s=1.0, idle=None,
         wants=None) -> PoolState:
    return PoolState(stage=stage, queued=queued, active=active, starting=starting, min_actors=low,
                     max_actors=high, max_in_flight=2, saturated=saturated, batch_s=batch_s, idle=idle or {},
                     wants=wants if wants is not None else {"CPU": 1.0})


def test_concurrency_is_a_fixed_count_and_bounds_are_validated():
    assert StageResources(concurrency=3).actor_range == (3, 3)
    assert not StageResources(concurrency=3).autoscaled
    assert StageResources(min_actors=1, max_actors=4).actor_range == (1, 4)
    assert StageResources(max_actors=4).actor_range == (1, 4)  # min defaults to concurrency (1)
    assert StageResources(concurrency=2, max_actors=6).actor_range == (2, 6)
    assert StageResources(min_actors=3).actor_range == (3, 3)
    with pytest.raises(ValueError, match="min_actors"):
        StageResources(min_actors=3, max_actors=2)
    with pytest.raises(ValueError):
        StageResources(max_actors=0)


def test_a_backed_up_stage_grows_by_its_backlog_within_max_and_free_resources():
    policy = AutoscalePolicy(backlog_s=2.0)
    nodes = [{"CPU": 8.0}]
    # 6 batches of 1 s queued on 1 actor: 6 s of backlog; 3 actors would each take 2 in flight.
    assert policy.decide([pool(queued=6)], nodes) == [Decision("grow", 0, count=3)]
    assert policy.decide([pool(queued=20, high=3)], nodes) == [Decision("grow", 0, count=2)]  # max_actors
    assert policy.decide([pool(queued=6)], [{"CPU": 1.5}]) == [Decision("grow", 0, count=1)]  # what fits
    assert policy.decide([pool(queued=6)], [{"CPU": 0.5}, {"CPU": 0.75}]) == []  # no node fits one actor


def test_no_growth_while_not_backed_up_or_still_starting():
    policy = AutoscalePolicy(backlog_s=2.0)
    nodes = [{"CPU": 8.0}]
    assert policy.decide([pool(queued=6, saturated=False)], nodes) == []  # an actor has room
    assert policy.decide([pool(queued=6, starting=1, active=2)], nodes) == []  # wait for the new actor
    assert policy.decide([pool(queued=6, batch_s=0.05)], nodes) == []  # a cheap stage drains it at once
    assert policy.decide([pool(queued=6, batch_s=None)], nodes) == []  # no batch measured yet
    assert policy.decide([pool(queued=6, active=4)], nodes) == []  # at max


def test_only_the_bottleneck_grows_and_gpus_are_shared_by_fraction():
    policy = AutoscalePolicy()
    generate = pool(stage=1, queued=10, batch_s=4.0, wants={"GPU": 1.0, "CPU": 1.0})
    score = pool(stage=2, queued=10, batch_s=0.5, wants={"GPU": 0.25, "CPU": 1.0})
    nodes = [{"GPU": 1.25, "CPU": 4.0}]
    # the generator (0.25 batches/s) is the bottleneck: the scorer (2/s) growing would only take its GPU
    assert policy.decide([score, generate], nodes) == [Decision("grow", 1, count=1)]
    # two stages as slow as each other both grow, the longest backlog first: the generator takes the whole
    # GPU, the scorer gets the quarter left
    score = pool(stage=2, queued=20, batch_s=4.0, wants={"GPU": 0.25, "CPU": 1.0})
    generate = pool(stage=1, queued=30, batch_s=4.0, wants={"GPU": 1.0, "CPU": 1.0})
    assert policy.decide([score, generate], nodes) == [Decision("grow", 1, count=1), Decision("grow", 2, count=1)]


def test_idle_actors_shrink_down_to_min_only_with_nothing_queued():
    policy = AutoscalePolicy(idle_s=5.0)
    idle = {0: 1.0, 1: 9.0, 2: 6.0}
    assert policy.decide([pool(active=3, idle=idle)], []) == [Decision("shrink", 0, actor=1),
                                                             Decision("shrink", 0, actor=2)]
    assert policy.decide([pool(active=3, low=2, idle=idle)], []) == [Decision("shrink", 0, actor=1)]
    assert policy.decide([pool(active=3, queued=1, idle=idle, saturated=False)], []) == []
    assert policy.decide([pool(active=1, idle={0: 60.0})], []) == []  # already at min


@pytest.mark.slow
def test_a_backed_up_stage_grows_and_an_idle_one_shrinks_on_ray(local_ray, sample_data, tmp_path):
    from conftest import demo_config
    from styledistill.pipeline.executor import RayExecutor
    from styledistill.pipeline.run import finished_shards, prepare_run
    from styledistill.pipeline.stages import build_stages
    from styledistill.pipeline.writer import ShardWriter

    config = demo_config(
        sample_data, tmp_path / "run", "plan.max_photos=6", "generator.backend=benchmark_sleep",
        "generator.options={latency_s: 0.5}", "scorers=[{backend: noop}]", "filters.rules=[]",
        "filters.generation_rules=[]", "stages.generate.num_cpus=0.25", "stages.generate.batch_size=2",
        "stages.generate.max_actors=3", "stages.generate.max_in_flight=1", "ray.groups_per_batch=1",
        "plan.samples_per_shard=24", "ray.max_shards_in_flight=8",
        "stages.score.num_cpus=0.25", "stages.score.min_actors=1", "stages.score.max_actors=2",
        "ray.autoscale.idle_s=0.5", "ray.autoscale.backlog_s=1.0")
    prepared = prepare_run(config)
    executor = RayExecutor(config, build_stages(config))
    executor.start()
    # The score pool is grown by hand at the start: with nothing for it to do yet, it must shrink back.
    score = [s.name for s in executor.stages].index("score")
    executor.pools[score].grow()
    results = []
    executor.run(prepared.planner.groups(), lambda shard: False, results.append,
                 functools.partial(ShardWriter.for_run, config, prepared.run_uri, prepared.meta))
    events = {(stage, kind) for _, stage, kind, _ in executor.scaling}
    assert ("generate", "grow") in events, executor.scaling
    assert ("score", "shrink") in events, executor.scaling
    assert executor.stage_stats["generate"]["actors_peak"] > 1
    assert sorted(r.shard for r in results) == sorted(finished_shards(prepared.run_uri))
    assert sum(r.failed for r in results) == 0 and sum(r.planned for r in results) == 24
    assert not executor.faults
