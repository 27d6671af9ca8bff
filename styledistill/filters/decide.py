"""The accept/reject decision: one pure function over stored scores, used by the shard writer, `refilter`
and `calibrate` alike, so a run can be re-decided with other thresholds without recomputing any score.

Every reason is structured (which rule, which score, which bound, the threshold and the value, the parent
generation it was inherited from, the sample it duplicates) next to its one-line text; the report and the
calibration read the structure, never the text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from styledistill.schemas import manifest as mf
from styledistill.schemas.config import FilterConfig, Rule
from styledistill.schemas.recipes import GENERATION_RECIPE, RECIPES

BAND, MISSING, DUPLICATE, FAILURE = "band", "missing", "duplicate", "failure"
_OPERATOR = {"min": "<", "max": ">"}


@dataclass(frozen=True)
class Reason:
    kind: str  # band | missing | duplicate | failure
    text: str  # the human-readable line, e.g. "effnet.content_cos < 0.4" or "parent r1: noop.pixel_diff < 0.03"
    rule: str | None = None  # "rules.2" or "generation_rules.0": the rule's place in the config
    score: str | None = None
    bound: str | None = None  # min | max (band only)
    threshold: float | None = None
    value: float | None = None
    inherited_from: str | None = None  # the parent generation slot (r_i) whose verdict this triplet inherits
    duplicate_of: str | None = None  # the key of the sample this one duplicates

    def as_row(self) -> dict:
        return asdict(self)

    @property
    def group(self) -> str:
        """The rule a report counts this under: one per (score, bound), whatever its per-recipe threshold."""
        if self.kind == BAND:
            return f"{self.score} {_OPERATOR[self.bound]}"
        if self.kind == MISSING:
            return f"{self.score} missing"
        return self.kind


@dataclass(frozen=True)
class Decision:
    status: str  # accepted | rejected | failed
    reasons: tuple[Reason, ...]

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.reasons]


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


def rule_reasons(rules: list[Rule], level: str, recipe: str, scores: Mapping[str, float]) -> list[Reason]:
    """Every rule of `rules` (the config list named `level`) that `scores` fail for `recipe`."""
    reasons = []
    for n, rule in enumerate(rules):
        limits = band(rule, recipe)
        if limits is None:
            continue
        rule_id = f"{level}.{n}"
        value = scores.get(rule.score)
        if value is None or math.isnan(value):
            if not rule.allow_missing:
                reasons.append(Reason(MISSING, f"{rule.score} missing", rule_id, rule.score))
            continue
        for bound, threshold in zip(("min", "max"), limits):
            outside = threshold is not None and (value < threshold if bound == "min" else value > threshold)
            if outside:
                reasons.append(Reason(BAND, f"{rule.score} {_OPERATOR[bound]} {threshold:g}", rule_id, rule.score,
                                      bound, float(threshold), float(value)))
    return reasons


def generation_reasons(filters: FilterConfig, scores: Mapping[str, float]) -> list[Reason]:
    """A V1 output is judged as its own view (c, s_i, r_i), an RnS triplet, by generation_rules if given."""
    level = "generation_rules" if filters.generation_rules else "rules"
    return rule_reasons(getattr(filters, level), level, GENERATION_RECIPE, scores)


def decide(filters: FilterConfig, recipe: str, scores: Mapping[str, float],
           parent_scores: Mapping[str, Mapping[str, float]], *, duplicate_of: str | None = None,
           error: str | None = None) -> Decision:
    """The status of one triplet.

    `parent_scores` holds the scores of each generation r_i the triplet is built on (by slot); a recipe that
    is not itself its generation's view inherits each failing parent's reasons. `error` (a missing image, a
    scorer that failed, a lost batch) makes the sample failed; `duplicate_of` rejects it.
    """
    if error is not None:
        return Decision(mf.FAILED, (Reason(FAILURE, error),))
    reasons = rule_reasons(filters.rules, "rules", recipe, scores)
    if recipe not in RECIPES or not RECIPES[recipe].is_generation_view:  # that one *is* its parent's view
        for slot, parent in sorted(parent_scores.items()):  # by slot: the order the scores were stored in never matters
            for reason in generation_reasons(filters, parent):
                reasons.append(Reason(**{**reason.as_row(), "text": f"parent {slot}: {reason.text}",
                                         "inherited_from": slot}))
    if duplicate_of is not None:
        reasons.append(Reason(DUPLICATE, f"duplicate of {duplicate_of}", duplicate_of=duplicate_of))
    return Decision(mf.REJECTED if reasons else mf.ACCEPTED, tuple(reasons))
