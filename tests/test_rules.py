"""Accept/reject rules over stored scores: bands, recipe limits, per-recipe overrides, missing scores."""

from __future__ import annotations

import math

import pytest

from styledistill.filters import decide
from styledistill.filters.decide import band
from styledistill.schemas.config import FilterConfig, Rule


def failing_rules(rules, recipe, scores) -> list[str]:
    return [r.text for r in decide.rule_reasons(rules, "rules", recipe, scores)]


def generation_reasons(filters, scores) -> list[str]:
    return [r.text for r in decide.generation_reasons(filters, scores)]


def rule(**kw) -> Rule:
    return Rule.model_validate(kw)


def test_band_min_and_max():
    rules = [rule(score="a", min=0.5, max=0.9)]
    assert failing_rules(rules, "rns", {"a": 0.7}) == []
    assert failing_rules(rules, "rns", {"a": 0.5}) == []  # bounds are inclusive
    assert failing_rules(rules, "rns", {"a": 0.9}) == []
    assert failing_rules(rules, "rns", {"a": 0.49}) == ["a < 0.5"]
    assert failing_rules(rules, "rns", {"a": 0.91}) == ["a > 0.9"]


def test_one_sided_bands():
    assert failing_rules([rule(score="a", min=0.2)], "sns", {"a": 1e9}) == []
    assert failing_rules([rule(score="a", min=0.2)], "sns", {"a": 0.1}) == ["a < 0.2"]
    assert failing_rules([rule(score="a", max=0.0)], "sns", {"a": -5.0}) == []
    assert failing_rules([rule(score="a", max=0.0)], "sns", {"a": 0.01}) == ["a > 0"]


def test_recipes_limit_where_a_rule_applies():
    rules = [rule(score="a", min=0.5, recipes=["rns", "sns"])]
    assert failing_rules(rules, "rns", {"a": 0.1}) == ["a < 0.5"]
    assert failing_rules(rules, "sns", {"a": 0.1}) == ["a < 0.5"]
    assert failing_rules(rules, "snr", {"a": 0.1}) == []
    assert failing_rules(rules, "rnr", {}) == []  # not applicable: not even a missing score counts
    assert band(rules[0], "rnr") is None
    assert band(rules[0], "rns") == (0.5, None)


def test_per_recipe_overrides_only_the_bound_it_names():
    r = rule(score="a", min=0.5, max=0.9, per_recipe={"snr": {"min": 0.1}, "rnr": {"max": 2.0}})
    assert band(r, "rns") == (0.5, 0.9)
    assert band(r, "snr") == (0.1, 0.9)
    assert band(r, "rnr") == (0.5, 2.0)
    assert failing_rules([r], "snr", {"a": 0.2}) == []
    assert failing_rules([r], "snr", {"a": 0.95}) == ["a > 0.9"]
    assert failing_rules([r], "rnr", {"a": 1.5}) == []
    assert failing_rules([r], "rnr", {"a": 0.2}) == ["a < 0.5"]
    assert failing_rules([r], "rns", {"a": 0.2}) == ["a < 0.5"]


def test_per_recipe_can_clear_a_bound_or_be_the_only_band():
    cleared = rule(score="a", min=0.5, per_recipe={"rnr": {"min": None}})
    assert band(cleared, "rnr") is None  # explicit null: no band left for that recipe
    assert failing_rules([cleared], "rnr", {}) == []
    assert failing_rules([cleared], "rns", {"a": 0.1}) == ["a < 0.5"]

    only = rule(score="a", per_recipe={"sns": {"max": 0.3}})
    assert band(only, "sns") == (None, 0.3)
    assert band(only, "rns") is None
    assert failing_rules([only], "rns", {"a": 9.0}) == []
    assert failing_rules([only], "sns", {"a": 0.4}) == ["a > 0.3"]


def test_per_recipe_respects_the_recipes_limit():
    r = rule(score="a", min=0.5, recipes=["rns"], per_recipe={"sns": {"min": 0.1}})
    assert band(r, "sns") is None
    assert failing_rules([r], "sns", {"a": 0.0}) == []


@pytest.mark.parametrize("scores", [{}, {"b": 1.0}, {"a": math.nan}, {"a": float("nan")}])
def test_missing_or_nan_score_is_named(scores):
    assert failing_rules([rule(score="a", min=0.5)], "rns", scores) == ["a missing"]
    assert failing_rules([rule(score="a", min=0.5, allow_missing=True)], "rns", scores) == []


def test_allow_missing_still_checks_a_present_score():
    r = rule(score="a", min=0.5, allow_missing=True)
    assert failing_rules([r], "rns", {"a": 0.1}) == ["a < 0.5"]


def test_every_failing_rule_is_named_in_order():
    rules = [
        rule(score="content", min=0.5),
        rule(score="style", min=0.6, max=0.95),
        rule(score="leak", max=0.0),
        rule(score="nsfw", max=0.5),
        rule(score="judge", min=3),
        rule(score="edges", min=0.2, recipes=["rnr"]),
    ]
    scores = {"content": 0.4, "style": 0.99, "leak": 0.25, "nsfw": 0.1}
    assert failing_rules(rules, "sns", scores) == ["content < 0.5", "style > 0.95", "leak > 0", "judge missing"]
    assert failing_rules(rules, "rnr", scores) == ["content < 0.5", "style > 0.95", "leak > 0", "judge missing",
                                                   "edges missing"]


def test_two_rules_on_one_score_both_apply():
    rules = [rule(score="a", min=0.5), rule(score="a", max=0.1)]
    assert failing_rules(rules, "rns", {"a": 0.3}) == ["a < 0.5", "a > 0.1"]


def test_generation_reasons_use_generation_rules_when_given():
    filters = FilterConfig(generation_rules=[rule(score="gen", min=0.5)],
                           rules=[rule(score="content", min=0.9)])
    assert generation_reasons(filters, {"gen": 0.4, "content": 0.1}) == ["gen < 0.5"]
    assert generation_reasons(filters, {"gen": 0.6}) == []


def test_generation_reasons_fall_back_to_the_rns_band_of_the_rules():
    filters = FilterConfig(rules=[
        rule(score="content", min=0.5, per_recipe={"rns": {"min": 0.7}, "snr": {"min": 0.1}}),
        rule(score="style", min=0.5, recipes=["sns", "snr"]),  # not an RnS rule: ignored for generations
        rule(score="nsfw", max=0.5),
    ])
    assert generation_reasons(filters, {"content": 0.6, "style": 0.0, "nsfw": 0.0}) == ["content < 0.7"]
    assert generation_reasons(filters, {"content": 0.8, "nsfw": 0.9}) == ["nsfw > 0.5"]
    assert generation_reasons(filters, {"content": 0.8}) == ["nsfw missing"]
    assert generation_reasons(FilterConfig(), {}) == []
