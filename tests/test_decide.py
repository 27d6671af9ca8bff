"""The decision function, case by case: inherited parent verdicts, per-recipe bands, duplicates, failures."""

from __future__ import annotations

import pytest

from styledistill.filters.decide import BAND, DUPLICATE, FAILURE, MISSING, Reason, decide
from styledistill.schemas import manifest as mf
from styledistill.schemas.config import FilterConfig

FILTERS = FilterConfig.model_validate({
    "generation_rules": [{"score": "gen.quality", "min": 0.5}],
    "rules": [
        {"score": "x.content", "min": 0.4, "per_recipe": {"sns": {"min": 0.2}}},
        {"score": "x.style", "min": 0.1, "recipes": ["rns", "sns"]},
    ],
})
GOOD = {"x.content": 0.9, "x.style": 0.5}
BAD_PARENT = {"gen.quality": 0.3}
GOOD_PARENT = {"gen.quality": 0.8}


@pytest.mark.parametrize("recipe,parents", [("sns", {"r0": GOOD_PARENT, "r1": BAD_PARENT}),
                                            ("snr", {"r1": BAD_PARENT})])
def test_a_triplet_built_on_a_failing_generation_inherits_its_rule(recipe, parents):
    decision = decide(FILTERS, recipe, GOOD, parents)
    assert decision.status == mf.REJECTED
    assert decision.reasons == (Reason(BAND, "parent r1: gen.quality < 0.5", "generation_rules.0", "gen.quality",
                                       "min", 0.5, 0.3, inherited_from="r1"),)


def test_rns_is_its_generations_view_and_does_not_inherit_a_second_time():
    assert decide(FILTERS, "rns", GOOD, {"r0": BAD_PARENT}).status == mf.ACCEPTED


def test_without_generation_rules_a_generation_is_judged_by_the_rns_band_of_rules():
    filters = FilterConfig.model_validate({"rules": [{"score": "x.style", "min": 0.1, "recipes": ["rns"]}]})
    decision = decide(filters, "snr", {}, {"r0": {"x.style": 0.05}})
    assert decision.texts == ["parent r0: x.style < 0.1"] and decision.reasons[0].rule == "rules.0"
    # The rule itself does not apply to SnR, so only the inherited verdict counts.
    assert decide(filters, "snr", {}, {"r0": {"x.style": 0.5}}).status == mf.ACCEPTED


def test_per_recipe_bands_and_recipe_limits():
    scores = {"x.content": 0.3, "x.style": 0.0}
    rns = decide(FILTERS, "rns", scores, {})
    assert rns.texts == ["x.content < 0.4", "x.style < 0.1"]
    assert [(r.threshold, r.value) for r in rns.reasons] == [(0.4, 0.3), (0.1, 0.0)]
    assert decide(FILTERS, "sns", scores, {}).texts == ["x.style < 0.1"]  # SnS band is 0.2
    assert decide(FILTERS, "rnr", scores, {}).texts == ["x.content < 0.4"]  # style rule limited to rns, sns


def test_a_missing_score_rejects_with_its_own_kind():
    decision = decide(FILTERS, "rnr", {}, {})
    assert [(r.kind, r.score, r.rule) for r in decision.reasons] == [(MISSING, "x.content", "rules.0")]
    assert decision.reasons[0].group == "x.content missing"


def test_a_duplicate_is_rejected_naming_the_sample_it_repeats():
    decision = decide(FILTERS, "rnr", GOOD, {}, duplicate_of="rnr_abc")
    assert decision.status == mf.REJECTED
    assert decision.reasons == (Reason(DUPLICATE, "duplicate of rnr_abc", duplicate_of="rnr_abc"),)


def test_an_error_makes_the_sample_failed_whatever_its_scores():
    decision = decide(FILTERS, "sns", GOOD, {"r1": BAD_PARENT}, error="scorer clip: ValueError: boom")
    assert decision.status == mf.FAILED
    assert decision.reasons == (Reason(FAILURE, "scorer clip: ValueError: boom"),)


def test_all_good_is_accepted_with_no_reasons():
    decision = decide(FILTERS, "sns", GOOD, {"r0": GOOD_PARENT, "r1": GOOD_PARENT})
    assert decision.status == mf.ACCEPTED and decision.reasons == ()
