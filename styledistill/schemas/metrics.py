"""metrics.json: the throughput of every attempt of a run, and the run as a whole.

Each attempt (a first run, a resume, a rerun of a finished run) appends its own record to `attempts`; the
top-level fields add them up over the whole history, so readers of the older single-attempt file
(`wall_s`, `samples_per_s`, `stages.<name>.busy_s` / `actors`) keep working:

    {"wall_s", "samples", "shards_written", "samples_per_s",
     "stages": {name: {"groups", "samples", "busy_s", "actors", "actor_s"}},   # whole run
     "attempts": [{"started", "wall_s", "samples", "shards_written", "shards_skipped", "samples_per_s",
                   "executor", "stages": {name: {"groups", "samples", "busy_s", "actors", "up_s"}}}, ...]}

`actor_s` is the actor-seconds a stage had (actors x wall, summed over attempts): a stage's utilisation over
the run is `busy_s / actor_s`, right even when the attempts ran different actor counts. `up_s` (Ray) is how
long into the attempt the stage's first actor had its models loaded; the stages before it worked meanwhile,
and an attempt's `wall_s` counts from when the last stage was up.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from styledistill.io import uris
from styledistill.schemas.manifest import METRICS_FILE


def attempts_of(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The attempts recorded; a file from before the history was kept is one attempt."""
    if not metrics:
        return []
    if "attempts" in metrics:
        return list(metrics["attempts"])
    return [{k: v for k, v in metrics.items() if k != "attempts"}]


def whole_run(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """The top-level fields: every attempt added up."""
    wall = sum(a.get("wall_s") or 0.0 for a in attempts)
    samples = sum(a.get("samples") or 0 for a in attempts)
    stages: dict[str, dict[str, Any]] = {}
    for attempt in attempts:
        for name, m in (attempt.get("stages") or {}).items():
            total = stages.setdefault(name, {"groups": 0, "samples": 0, "busy_s": 0.0, "actors": 0, "actor_s": 0.0})
            total["groups"] += m.get("groups") or 0
            total["samples"] += m.get("samples") or 0
            total["busy_s"] += m.get("busy_s") or 0.0
            total["actors"] = max(total["actors"], m.get("actors") or 0)  # the most any attempt ran
            total["actor_s"] += _actor_s(m, attempt)
    faults: Counter = Counter()
    for attempt in attempts:
        faults.update(attempt.get("faults") or {})
    return {
        "wall_s": wall,
        "samples": samples,
        "faults": dict(faults),  # what every attempt survived, added up
        "shards_written": sum(a.get("shards_written") or 0 for a in attempts),
        "samples_per_s": samples / wall if wall else None,
        "stages": stages,
        "attempts": attempts,
    }


def utilisation(attempt: dict[str, Any]) -> dict[str, float]:
    """Busy share of each stage's actor time in one attempt (busy_s / (actors x wall_s)), in record order."""
    wall = attempt.get("wall_s") or 0.0
    return {name: m["busy_s"] / _actor_s(m, attempt) for name, m in (attempt.get("stages") or {}).items()
            if wall and m.get("actors") and m.get("busy_s") is not None}


def read_metrics(run_uri: str) -> dict[str, Any]:
    uri = uris.join(run_uri, METRICS_FILE)
    return json.loads(uris.read_bytes(uri)) if uris.exists(uri) else {}


def append_attempt(run_uri: str, attempt: dict[str, Any]) -> dict[str, Any]:
    """Add this attempt to the run's history and rewrite metrics.json (atomically); returns what was written."""
    try:
        previous = attempts_of(read_metrics(run_uri))
    except (ValueError, OSError):  # an unreadable file from a killed attempt: start the history again
        previous = []
    metrics = whole_run([*previous, attempt])
    uris.write_text_atomic(uris.join(run_uri, METRICS_FILE), json.dumps(metrics, indent=1))
    return metrics


def _actor_s(stage: dict[str, Any], attempt: dict[str, Any]) -> float:
    """A stage's actor-seconds in one attempt: measured by the executor (autoscaled pools vary), else
    actors x wall."""
    return stage.get("actor_s") or (stage.get("actors") or 0) * (attempt.get("wall_s") or 0.0)
