"""The triplet recipes, declared once: the planner, the filters and the report read this table.

A recipe says which images of a group fill the three roles of a triplet (content ref, style ref, target).
Roles are written as slot templates: `c` the content photo, `s{i}` a style reference, `r{i}` the V1 output
`G(c, s_i)`, `r{j}` another V1 output of the same photo (j != i), `p` a fresh realistic partner photo.
Adding a recipe is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from styledistill.schemas.records import CONTENT_SLOT, is_result_slot, result_slot, style_slot

PARTNER = "p"  # a role filled by a realistic photo other than c, drawn when the triplet is chosen


@dataclass(frozen=True)
class Recipe:
    name: str
    roles: tuple[str, str, str]  # slot templates of (content ref, style ref, target)
    target_label: str  # what the target must look like: "stylized" or "realistic" (the judge asks for it)
    teaches: str
    # True when the triplet *is* the view (c, s_i, r_i) its generation is judged on, so it does not inherit
    # its parent's verdict a second time; every other recipe built on an r_i inherits that r_i's rejection.
    is_generation_view: bool = False

    @property
    def title(self) -> str:
        """The paper's spelling: RnS, SnS, SnR, RnR."""
        return self.name[0].upper() + self.name[1] + self.name[2].upper()

    @property
    def needs_partner(self) -> bool:
        return PARTNER in self.roles

    @property
    def target_is_generation(self) -> bool:
        return is_result_slot(self.roles[2].format(i=0, j=1))

    def candidates(self, k: int) -> list[tuple[str, str, str]]:
        """Every triplet of this recipe a group with k generations could yield, in a fixed order.

        Templates without an index still yield k candidates (one per generation), so a recipe's share of
        the draw does not depend on whether its roles name a generation.
        """
        uses_j = any("{j}" in role for role in self.roles)
        out = []
        for i in range(k):
            for j in (range(k) if uses_j else (None,)):
                if j == i:
                    continue
                out.append(tuple(_slot(role, i, j) for role in self.roles))
        return out


def _slot(template: str, i: int, j: int | None) -> str:
    if template in (CONTENT_SLOT, PARTNER):
        return template
    kind, index = template[0], template[1:].format(i=i, j=j)
    return style_slot(int(index)) if kind == "s" else result_slot(int(index))


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("rns", ("c", "s{i}", "r{i}"), "stylized", "V1's own task: photo in a painted style",
               is_generation_view=True),
        Recipe("sns", ("r{j}", "s{i}", "r{i}"), "stylized", "restyle an already stylized image"),
        Recipe("snr", ("r{i}", PARTNER, "c"), "realistic", "back to a photo: the target is the original"),
        Recipe("rnr", ("c", PARTNER, "c"), "realistic", "a photo as style reference keeps the photo"),
    )
}
RECIPE_NAMES: tuple[str, ...] = tuple(RECIPES)
# The recipe a V1 output is judged as: its own (c, s_i, r_i) view.
GENERATION_RECIPE = next(r.name for r in RECIPES.values() if r.is_generation_view)


def recipe_sorted(names) -> list[str]:
    """Known recipes in table order, then any others alphabetically (e.g. from an audited dataset)."""
    names = set(names)
    return [r for r in RECIPE_NAMES if r in names] + sorted(r for r in names if r not in RECIPES)
