"""TeleStyle V2's prompt enhancer: a VLM names the content reference's main objects and the style
reference's style in a few words, which are appended to the edit instruction.

The two instructions are V2's, verbatim as in its released demo (Tele-AI/TeleStyleV2,
gradio_telestylev2_QIE2509_dmd_diffusers.py; the double space is theirs): the content image and the style
image are each described in their own request, as V2 does. V2 decodes with max_new_tokens 1024 and uses the
raw answer; here answers are cleaned (quotes, punctuation, "Answer:"-style labels, list markers removed;
lower case; items joined by ", ") and checked against the instruction's own limit: content strictly fewer
than 3 words, style at most 5. An answer over the limit is rejected (prompt None, `error` says why) rather
than cut, because the first words of a long answer are not a summary of it and a rambling answer often
names objects; the pair then keeps the plain instruction. A token cap far below 1024 therefore loses
nothing: an answer that long would be rejected anyway.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

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
_NOT_WORD = re.compile(r"[^\w\s'-]")


class EnhancerOptions(BackendOptions):
    vlm: VLMOptions
    max_new_tokens: int = Field(64, ge=8)
    content_max_words: int = Field(2, ge=1)  # "strictly fewer than 3"
    style_max_words: int = Field(5, ge=1)  # "in 5 words"


def clean_answer(text: str) -> list[str]:
    """The answer as lower-case items ("oil painting", "thick strokes"), without labels and punctuation."""
    text = _LABEL.sub("", text.strip())
    items = []
    for part in _ITEM_SPLIT.split(text):
        part = _LIST_MARKER.sub("", part.strip())
        part = _NOT_WORD.sub(" ", part).strip(" '-").lower()
        words = part.split()
        if words:
            items.append(" ".join(words))
    return items


def checked_prompt(text: str, max_words: int) -> tuple[str | None, str | None]:
    """(prompt, None) when the cleaned answer has 1..max_words words, else (None, why)."""
    items = clean_answer(text)
    count = sum(len(item.split()) for item in items)
    if count == 0:
        return None, f"empty answer: {text[:200]!r}"
    if count > max_words:
        return None, f"{count} words, more than {max_words}: {text[:200]!r}"
    return ", ".join(items), None


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
        limits = {"content": self.options.content_max_words, "style": self.options.style_max_words}
        out = []
        for slots in asked:
            entry: dict[str, str | None] = {"content_prompt": None, "style_prompt": None, "error": None}
            errors = []
            for kind in ("content", "style"):
                answer = answers[slots[kind]]
                if answer.error:
                    prompt, why = None, answer.error
                else:
                    prompt, why = checked_prompt(answer.text, limits[kind])
                entry[f"{kind}_prompt"] = prompt
                if why:
                    errors.append(f"{kind}: {why}")
            entry["error"] = "; ".join(errors) or None
            out.append(entry)
        return out

    def model_info(self) -> dict[str, str]:
        info = self.client.model_info()
        instructions = (CONTENT_INSTRUCTION + "\n" + STYLE_INSTRUCTION).encode()
        info["enhancer_instructions_sha256"] = hashlib.sha256(instructions).hexdigest()[:16]
        return info
