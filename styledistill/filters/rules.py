"""Config-driven accept/reject rules over stored scores. Every failing rule is named in the reasons.

Scores are computed and stored before any rule runs; this module only reads them, so thresholds can be
changed and a run re-decided without recomputing a single score.
"""

from __future__ import annotations

import math

from styledistill.schemas.config import FilterConfig, Rule
from styledistill.schemas.recipes import GENERATION_RECIPE


def band(rule: Rule, recipe: str) -> tuple[float | None, float | None] | None:
    """The (min, max) that applies to `recipe`, or None when the rule does not apply to it."""
    if rule.recipes is not None and recipe not in rule.recipes:
        return None
    override = rule.per_recipe.get(recipe, {})
    low = override.get("min", rule.min)
    high = override.get("max", rule.max)
    if low is None and high is None:
        return None
    return low, high


def failing_rules(rules: list[Rule], recipe: str, scores: dict[str, float]) -> list[str]:
    reasons = []
    for rule in rules:
        limits = band(rule, recipe)
        if limits is None:
            continue
        value = scores.get(rule.score)
        if value is None or math.isnan(value):
            if not rule.allow_missing:
                reasons.append(f"{rule.score} missing")
            continue
        low, high = limits
        if low is not None and value < low:
            reasons.append(f"{rule.score} < {low:g}")
        if high is not None and value > high:
            reasons.append(f"{rule.score} > {high:g}")
    return reasons


def generation_reasons(filters: FilterConfig, scores: dict[str, float]) -> list[str]:
    """A V1 output is judged as its own view (c, s_i, r_i), an RnS triplet, by generation_rules if given."""
    return failing_rules(filters.generation_rules or filters.rules, GENERATION_RECIPE, scores)
