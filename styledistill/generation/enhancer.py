"""TeleStyle V2's prompt enhancer: a VLM names the content reference's main objects and the style
reference's style in a few words, which are appended to the edit instruction.

The two instructions are V2's, verbatim as in its released demo (Tele-AI/TeleStyleV2,
gradio_telestylev2_QIE2509_dmd_diffusers.py; the double space is theirs): the content image and the style
image are each described in their own request, as V2 does. V2 decodes with max_new_tokens 1024 and appends
its raw answer. Here the answer is kept as V2 would append it, only tidied (surrounding quotes, an
"Answer:"-style label, list markers and a final full stop removed, whitespace collapsed, items joined by
", "), and bounded in items and characters rather than counted in words: a good style answer such as
"impressionist oil painting, thick brushstrokes, warm light" has 6 words but 3 items and 57 characters.
An answer over a bound is dropped (prompt None) rather than cut, because the first part of a rambling answer
is not a summary of it; the pair then keeps the plain instruction. Each dropped answer is recorded with a
reason code in the entry's `dropped` (`empty`, `too_many_items`, `sentence`, `too_long`,
`endpoint_error`), which the
writer stores in every sample's manifest `notes` (under `prompts`) and metadata.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from pydantic import Field

from styledistill.backends import Backend, BackendOptions
from styledistill.vlm import ChatRequest, VLMClient, VLMOptions, build_client

CONTENT_INSTRUCTION = (
    "describe main objects (fewer than 3) with separated words, each word is separated by comma,  "
    "the total number of words is strictly fewer than 3"
)
STYLE_INSTRUCTION = (
    "describe only the artistic style, material and stroke, lighting, color in 5 words, not objects."
)

_LABEL = re.compile(r"^\s*(?:answer|content|style|main objects|objects|words)\s*:\s*", re.IGNORECASE)
_ITEM_SPLIT = re.compile(r"[,;\n]")
_LIST_MARKER = re.compile(r"^(?:\d+[.)]|[-*•])\s*")
_EDGE = " \t\"'`*.。"


class EnhancerOptions(BackendOptions):
    vlm: VLMOptions
    max_new_tokens: int = Field(64, ge=8)
    # Bounds on the tidied answer: items (comma-separated parts) and characters. Content: "fewer than 3"
    # objects; style: "5 words" that VLMs give as a few short phrases.
    # An item of more words is a sentence, not a name or a style term ("a small cat on a sofa").
    content_max_items: int = Field(2, ge=1)
    content_max_item_words: int = Field(3, ge=1)
    content_max_chars: int = Field(40, ge=1)
    style_max_items: int = Field(5, ge=1)
    style_max_item_words: int = Field(4, ge=1)
    style_max_chars: int = Field(100, ge=1)


def clean_answer(text: str) -> list[str]:
    """The answer's items as V2 would append them ("Oil painting", "thick strokes"): label, list markers,
    quotes and final full stops removed, whitespace collapsed; case and wording kept."""
    text = _LABEL.sub("", text.strip().strip(_EDGE))
    items = []
    for part in _ITEM_SPLIT.split(text):
        part = " ".join(_LIST_MARKER.sub("", part.strip()).split()).strip(_EDGE)
        if part:
            items.append(part)
    return items


def checked_prompt(
    text: str, max_items: int, max_chars: int, max_item_words: int = 4
) -> tuple[str | None, str | None]:
    """(prompt, None) when the tidied answer has 1..max_items items of at most max_item_words words and
    at most max_chars characters in all, else (None, "<reason code>: detail")."""
    items = clean_answer(text)
    prompt = ", ".join(items)
    if not items:
        return None, f"empty: {text[:200]!r}"
    if len(items) > max_items:
        return None, f"too_many_items: {len(items)} > {max_items}: {text[:200]!r}"
    longest = max(len(item.split()) for item in items)
    if longest > max_item_words:
        return None, f"sentence: an item of {longest} words > {max_item_words}: {text[:200]!r}"
    if len(prompt) > max_chars:
        return None, f"too_long: {len(prompt)} > {max_chars} characters: {text[:200]!r}"
    return prompt, None


def enhanced_instruction(base: str, content_prompt: str | None, style_prompt: str | None) -> str:
    """V2's join: the instruction, then the content words, then the style words, separated by commas."""
    return ",".join([base, *(p for p in (content_prompt, style_prompt) if p)])


class PromptEnhancer(Backend):
    kind = "enhancer"
    name = "qwen_vl"
    Options = EnhancerOptions

    def setup(self) -> None:
        self.client: VLMClient = build_client(self.options.vlm, device=self.device, threads=self.threads)
        self.client.setup()

    def describe(self, content_images: list[np.ndarray], style_images: list[np.ndarray]) -> list[dict]:
        """Per (content, style) pair: {"content_prompt", "style_prompt", "error"}; never raises per pair."""
        if len(content_images) != len(style_images):
            raise ValueError(f"{len(content_images)} content images but {len(style_images)} style images")
        # Triplets of a group share references (c is the content of every RnS and RnR triplet, s_i the
        # style of RnS_i and SnS_i): each distinct (question, image) is asked once.
        instructions = {"content": CONTENT_INSTRUCTION, "style": STYLE_INSTRUCTION}
        request_of: dict[tuple, int] = {}
        requests: list[ChatRequest] = []
        asked: list[dict[str, int]] = []
        for content, style in zip(content_images, style_images):
            slots = {}
            for kind, image in (("content", content), ("style", style)):
                key = (kind, image.shape, hashlib.sha1(image.tobytes()).digest())
                if key not in request_of:
                    request_of[key] = len(requests)
                    requests.append(ChatRequest([image], instructions[kind], self.options.max_new_tokens))
                slots[kind] = request_of[key]
            asked.append(slots)
        answers = self.client.chat(requests)
        o = self.options
        limits = {
            "content": (o.content_max_items, o.content_max_chars, o.content_max_item_words),
            "style": (o.style_max_items, o.style_max_chars, o.style_max_item_words),
        }
        out = []
        for slots in asked:
            entry: dict = {"content_prompt": None, "style_prompt": None, "error": None, "dropped": {}}
            errors = []
            for kind in ("content", "style"):
                answer = answers[slots[kind]]
                if answer.error:
                    prompt, why = None, f"endpoint_error: {answer.error}"
                else:
                    prompt, why = checked_prompt(answer.text, *limits[kind])
                entry[f"{kind}_prompt"] = prompt
                if why:
                    errors.append(f"{kind}: {why}")
                    entry["dropped"][kind] = why.split(":", 1)[0]
            entry["error"] = "; ".join(errors) or None
            out.append(entry)
        return out

    def model_info(self) -> dict[str, str]:
        info = self.client.model_info()
        instructions = (CONTENT_INSTRUCTION + "\n" + STYLE_INSTRUCTION).encode()
        info["enhancer_instructions_sha256"] = hashlib.sha256(instructions).hexdigest()[:16]
        return info
