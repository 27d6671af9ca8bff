"""A VLM judge for (content ref, style ref, target) triplets, in the spirit of VIEScore / ImgEdit-Bench.

The judge sees the three images in that order, with a question that fits the view's recipe (RnS/SnS: the
target is image 1 in image 2's artistic style; SnR/RnR: a natural photo with image 1's content), and must
answer one JSON object:
`{"style_consistency": 0-10, "content_preservation": 0-10, "image_quality": 0-10, "content_leakage": bool}`.
Parsing is strict: the object (optionally in a ```json fence, prose around it is ignored), all four keys,
numbers within 0..10, a JSON boolean for leakage. Anything else leaves the scores missing and keeps the raw
text in `notes["judge_raw"]` with the reason in `notes["judge_error"]`. A value is never guessed (VIEScore's
parser falls back to a random integer; that would put noise into the filter).

Scores (prefixed with "judge." by the pipeline): `style`, `content`, `quality` in 0..10; `leakage` 1.0 when
the judge saw content of the style reference in the target, else 0.0; `overall` = sqrt(min(style, content)
* quality), VIEScore's aggregation with style and content as its two consistency criteria: the weaker of the
two decides, and a broken image pulls the score down. Leakage stays a separate score for a filter rule.

Routing: with `route`, only views whose earlier score (e.g. "clip.content_cos") lies in [low, high] are
judged; views outside the band get no judge scores and `notes["judge_skipped"]`. A view without that score
is judged, since nothing cheaper decided it. The routing scorer must run before the judge.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

from pydantic import Field, model_validator

from styledistill.backends import BackendOptions
from styledistill.schemas.recipes import GENERATION_RECIPE, RECIPES
from styledistill.scoring.base import Scorer, ViewScores
from styledistill.vlm import ChatRequest, VLMClient, VLMOptions, build_client

_JUDGE_HEAD = """You are an expert judge of image style transfer.
Image 1 is the content reference. Image 2 is the style reference. Image 3 is the result, which should show \
{task}

Rate Image 3:
- style_consistency (integer 0-10): {style}
- content_preservation (integer 0-10): how well Image 3 keeps the objects, layout, poses and identity of \
Image 1. 0 = different content, 10 = all content kept.
- image_quality (integer 0-10): how free Image 3 is of artifacts, distortions, blur and noise. 0 = broken, \
10 = flawless.
- content_leakage (true or false): true if objects, people or scenery of Image 2 (not just its style) \
appear in Image 3.

Answer ONLY with one JSON object, no other text, exactly in this form:
{{"style_consistency": <0-10>, "content_preservation": <0-10>, \
"image_quality": <0-10>, "content_leakage": <true or false>}}"""

# The question depends on what the recipe's target is. RnS/SnS: Image 3 is Image 1 in Image 2's artistic
# style. SnR/RnR: Image 2 is a photo and the target is a natural photograph of Image 1's content (for SnR
# the original photo that Image 1 was stylized from), so "painted in the style of Image 2" would be wrong.
_STYLIZED = dict(
    task="the content of Image 1 painted in the artistic style of Image 2.",
    style="how well Image 3 matches the artistic style of Image 2 (colour palette, texture, brush strokes, "
    "medium). 0 = no resemblance, 10 = the same style.",
)
_REALISTIC = dict(
    task="the content of Image 1 as a natural, realistic photograph, like Image 2 (a photo), with no "
    "painting or illustration style left.",
    style="how much Image 3 looks like a natural photograph, as Image 2 does (real lighting, textures and "
    "camera look; no brush strokes, outlines or flat colours). 0 = clearly a painting or illustration, "
    "10 = an ordinary photo.",
)
# The question follows what the recipe's target must look like (schemas/recipes.py).
_BY_TARGET = {"stylized": _JUDGE_HEAD.format(**_STYLIZED), "realistic": _JUDGE_HEAD.format(**_REALISTIC)}
JUDGE_PROMPTS = {name: _BY_TARGET[recipe.target_label] for name, recipe in RECIPES.items()}
JUDGE_PROMPT = JUDGE_PROMPTS[GENERATION_RECIPE]  # V1's task: a generation view is an RnS view


def judge_prompt(recipe: str | None) -> str:
    """The judge's question for a view of `recipe` (a view without one is a generation view)."""
    # An audited triplet of unknown recipe is asked the generation view's question (a stylized target).
    return JUDGE_PROMPTS.get(recipe or GENERATION_RECIPE, JUDGE_PROMPTS[GENERATION_RECIPE])


SCORE_KEYS = {"style_consistency": "style", "content_preservation": "content", "image_quality": "quality"}
RAW_LIMIT = 2000
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


class JudgeParseError(ValueError):
    pass


def parse_judgement(text: str) -> dict[str, float]:
    """The judge's scores from its answer, or `JudgeParseError` saying why there are none."""
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        raise JudgeParseError("no JSON object in the answer")
    try:
        data = json.loads(body[start : end + 1])
    except json.JSONDecodeError as err:
        raise JudgeParseError(f"invalid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise JudgeParseError("the JSON is not an object")
    missing = [key for key in (*SCORE_KEYS, "content_leakage") if key not in data]
    if missing:
        raise JudgeParseError(f"missing keys: {', '.join(missing)}")
    scores = {}
    for key, name in SCORE_KEYS.items():
        value = data[key]
        # bool is an int in Python; `true` is not a score.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise JudgeParseError(f"{key} is not a number: {value!r}")
        if not 0 <= value <= 10:
            raise JudgeParseError(f"{key} out of range 0..10: {value!r}")
        scores[name] = float(value)
    leakage = data["content_leakage"]
    if not isinstance(leakage, bool):
        raise JudgeParseError(f"content_leakage is not true/false: {leakage!r}")
    scores["leakage"] = 1.0 if leakage else 0.0
    scores["overall"] = math.sqrt(min(scores["style"], scores["content"]) * scores["quality"])
    return scores


class Route(BackendOptions):
    score: str  # a prior score's full name, e.g. "clip.content_cos"
    low: float
    high: float

    @model_validator(mode="after")
    def _band(self) -> "Route":
        if self.low > self.high:
            raise ValueError("route low must be <= high")
        return self


class JudgeOptions(BackendOptions):
    vlm: VLMOptions
    route: Route | None = None
    max_new_tokens: int = Field(128, ge=16)  # the JSON answer is about 40 tokens


class VLMJudgeScorer(Scorer):
    name = "judge"
    # The judgement's scores, and `answered` (1: a usable answer, 0: routed but unusable).
    scores = (*SCORE_KEYS.values(), "leakage", "overall", "answered")
    Options = JudgeOptions

    def setup(self) -> None:
        self.client: VLMClient = build_client(self.options.vlm, device=self.device, threads=self.threads)
        self.client.setup()

    def _skip_note(self, prior: dict[str, float]) -> str | None:
        """Why a view is not judged, or None when it goes to the judge."""
        route = self.options.route
        if route is None or route.score not in prior:
            return None
        value = prior[route.score]
        if route.low <= value <= route.high:
            return None
        return f"not routed: {route.score}={value:.4g} outside [{route.low:g}, {route.high:g}]"

    def score_views(self, views, images, prior):
        results = [ViewScores() for _ in views]
        routed = []
        for i, view in enumerate(views):
            note = self._skip_note(prior[i])
            if note is None:
                routed.append(i)
            else:
                results[i].notes["judge_skipped"] = note
        requests = [
            ChatRequest(
                images=[images[views[i][role]] for role in ("content", "style", "target")],
                text=judge_prompt(views[i].get("recipe")),
                max_new_tokens=self.options.max_new_tokens,
            )
            for i in routed
        ]
        for i, answer in zip(routed, self.client.chat(requests)):
            # `answered` tells a routed view whose answer was unusable (0) from one never routed (absent),
            # so a rule `judge.answered min 1, allow_missing` rejects the first and lets the second through.
            results[i].scores["answered"] = 0.0
            if answer.error is not None:
                results[i].notes["judge_error"] = answer.error
                continue
            try:
                results[i].scores.update(parse_judgement(answer.text))
                results[i].scores["answered"] = 1.0
            except JudgeParseError as err:
                results[i].notes["judge_error"] = str(err)
                results[i].notes["judge_raw"] = answer.text[:RAW_LIMIT]
        return results

    def model_info(self) -> dict[str, str]:
        info = self.client.model_info()
        prompts = "\n".join(JUDGE_PROMPTS[r] for r in sorted(JUDGE_PROMPTS))
        info["judge_prompt_sha256"] = hashlib.sha256(prompts.encode()).hexdigest()[:16]
        return info
