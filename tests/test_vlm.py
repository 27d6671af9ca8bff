"""VLM clients, the VLM judge and the V2 prompt enhancer.

The in-process backend runs a tiny random Qwen2.5-VL saved to a temporary folder; the endpoint backend
talks to a scripted OpenAI-compatible server on 127.0.0.1 that records what it was sent.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from styledistill.generation.enhancer import (
    CONTENT_INSTRUCTION,
    STYLE_INSTRUCTION,
    PromptEnhancer,
    checked_prompt,
    clean_answer,
    enhanced_instruction,
)
from styledistill.scoring.vlm_judge import (
    JUDGE_PROMPT,
    JUDGE_PROMPTS,
    JudgeParseError,
    VLMJudgeScorer,
    parse_judgement,
)
from styledistill.vlm import ChatRequest, OpenAIVLMOptions, TransformersVLMOptions, build_client
from fake_openai import ScriptedServer, always, decode_data_url, endpoint, first_pixel
from tiny_vlm import save_tiny_qwen_vl


def answer(style=7, content=4, quality=9, leakage=False, drop: str | None = None) -> str:
    """A judge answer as JSON text; `drop` leaves one key out."""
    data = {"style_consistency": style, "content_preservation": content, "image_quality": quality,
            "content_leakage": leakage}
    data.pop(drop, None)
    return json.dumps(data)


VALID = answer()


def solid(value: int, height: int = 32, width: int = 32) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


def judge(vlm: dict, route: dict | None = None, **extra) -> VLMJudgeScorer:
    scorer = VLMJudgeScorer({"vlm": vlm, "route": route, **extra})
    scorer.setup()
    return scorer


def one_view(tag: int = 0) -> tuple[list[dict], dict]:
    """One view whose three images differ (content=10+tag, style=100+tag, target=200+tag)."""
    view = {"content": f"c{tag}", "style": f"s{tag}", "target": f"t{tag}"}
    images = {f"c{tag}": solid(10 + tag), f"s{tag}": solid(100 + tag), f"t{tag}": solid(200 + tag, 24, 40)}
    return [view], images


# --- the in-process transformers backend --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm_path(tmp_path_factory):
    path = save_tiny_qwen_vl(tmp_path_factory.mktemp("tiny_qwen_vl"))
    # Sampling on by default in the checkpoint: only an explicit greedy call gives repeatable answers.
    config = json.loads((path / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=5.0, top_k=0, top_p=1.0)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def test_transformers_backend_images_in_order_and_greedy(tiny_vlm_path):
    client = build_client(TransformersVLMOptions(backend="transformers", model_path=str(tiny_vlm_path)))
    client.setup()
    # Three sizes that give 1, 2 and 3 merged image tokens, so their order is visible in the inputs.
    images = [solid(10, 28, 28), solid(20, 56, 28), solid(30, 28, 84)]
    request = ChatRequest(images=images, text="rate these", max_new_tokens=6)

    inputs = client.prepare(request)
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 2], [1, 4, 2], [1, 2, 6]]
    tokenizer = client.processor.tokenizer
    ids = inputs["input_ids"][0].tolist()
    start, pad = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>"])
    runs = []
    for i, token in enumerate(ids):
        if token == start:
            runs.append(0)
        elif token == pad:
            runs[-1] += 1
    assert runs == [1, 2, 3]
    prompt = tokenizer.decode(ids)
    assert prompt.index("<|im_start|>user") < prompt.index("<|vision_start|>") < prompt.index("rate these")

    first = client.chat([request, request])
    second = client.chat([request])
    assert first[0].error is None and first[0].text is not None
    assert first[0].text == first[1].text == second[0].text
    info = client.model_info()
    assert info["vlm_backend"] == "transformers" and info["vlm_model"] == str(tiny_vlm_path)


def test_transformers_backend_one_bad_request_does_not_fail_the_batch(tiny_vlm_path):
    client = build_client(TransformersVLMOptions(backend="transformers", model_path=str(tiny_vlm_path)))
    client.setup()
    # Aspect ratio 300:1 is beyond what the Qwen image processor accepts.
    bad = ChatRequest(images=[solid(5, 1, 300)], text="x", max_new_tokens=2)
    good = ChatRequest(images=[solid(5)], text="x", max_new_tokens=2)
    results = client.chat([bad, good])
    assert results[0].text is None and "ValueError" in results[0].error
    assert results[1].error is None and results[1].text is not None


def test_transformers_backend_max_pixels_caps_the_image_grid(tiny_vlm_path):
    request = ChatRequest(images=[solid(1, 112, 112)], text="x", max_new_tokens=2)
    grids = []
    for cap in (None, 56 * 56):
        client = build_client(
            TransformersVLMOptions(backend="transformers", model_path=str(tiny_vlm_path), max_pixels=cap)
        )
        client.setup()
        grids.append(client.prepare(request)["image_grid_thw"].tolist())
    assert grids == [[[1, 8, 8]], [[1, 4, 4]]]  # 14-pixel patches: 112x112 as is, then capped to 56x56


def test_transformers_backend_missing_weights_name_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    client = build_client(TransformersVLMOptions(backend="transformers", model_path=str(missing)))
    with pytest.raises(FileNotFoundError, match="model directory not found: .*no_such_model"):
        client.setup()
    # A hub id is only looked up in the local cache, never downloaded.
    hub_id = TransformersVLMOptions(backend="transformers", model_path="Qwen/NotCached-VL")
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="'Qwen/NotCached-VL' is not in the local Hugging Face cache"):
        build_client(hub_id).setup()
    assert time.monotonic() - started < 5  # no network retries
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="cannot load a Qwen2.5-VL model from .*empty_folder"):
        build_client(TransformersVLMOptions(backend="transformers", model_path=str(empty))).setup()


def test_judge_with_in_process_model_keeps_unparseable_answer(tiny_vlm_path):
    # A random model does not answer JSON: the judge must report that, never invent scores.
    scorer = judge({"backend": "transformers", "model_path": str(tiny_vlm_path)}, max_new_tokens=16)
    views, images = one_view()
    [result] = scorer.score_views(views, images, [{}])
    assert result.scores == {"answered": 0.0}
    assert result.notes["judge_error"]
    assert "judge_raw" in result.notes


# --- the endpoint backend ---------------------------------------------------------------------------


def test_endpoint_gets_three_images_in_order_as_data_urls_greedy():
    with ScriptedServer(always(VALID)) as server:
        scorer = judge(endpoint(server))
        views, images = one_view(tag=3)
        [result] = scorer.score_views(views, images, [{}])
    [body] = server.requests
    assert body["model"] == "qwen-vl"
    assert body["temperature"] == 0
    assert body["max_tokens"] == scorer.options.max_new_tokens
    [message] = body["messages"]
    assert message["role"] == "user"
    parts = message["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "image_url", "text"]
    for part, role in zip(parts, ("content", "style", "target")):
        np.testing.assert_array_equal(decode_data_url(part["image_url"]["url"]), images[views[0][role]])
    assert parts[3]["text"] == JUDGE_PROMPT
    assert result.scores == {"style": 7.0, "content": 4.0, "quality": 9.0, "leakage": 0.0, "overall": 6.0,
                             "answered": 1.0}
    assert result.notes == {}


def test_judge_asks_each_recipe_its_own_question():
    """SnR/RnR targets are photos with image 1's content; asking for image 2's 'artistic style' is wrong."""
    recipes = ["rns", "sns", "snr", "rnr", None]  # None: a generation view (RnS)
    views, images = [], {}
    for tag, recipe in enumerate(recipes):
        [view], view_images = one_view(tag)
        views.append({**view, "recipe": recipe} if recipe else view)
        images.update(view_images)
    with ScriptedServer(always(VALID)) as server:
        judge(endpoint(server)).score_views(views, images, [{} for _ in views])
    asked = {}
    for body in server.requests:
        text = body["messages"][0]["content"][3]["text"]
        tag = int(decode_data_url(body["messages"][0]["content"][0]["image_url"]["url"])[0, 0, 0]) - 10
        asked[recipes[tag]] = text
    assert asked["rns"] == asked["sns"] == asked[None] == JUDGE_PROMPT
    assert asked["snr"] == asked["rnr"] == JUDGE_PROMPTS["snr"] != JUDGE_PROMPT
    assert "painted in the artistic style of Image 2" in asked["rns"]
    assert "natural, realistic photograph" in asked["snr"] and "painted" not in asked["snr"]


@pytest.mark.parametrize(
    "text, scores",
    [
        (VALID, {"style": 7.0, "content": 4.0, "quality": 9.0, "leakage": 0.0, "overall": 6.0}),
        (
            'Sure!\n```json\n{"style_consistency": 8, "content_preservation": 8.5, "image_quality": 2,'
            ' "content_leakage": true}\n```',
            {"style": 8.0, "content": 8.5, "quality": 2.0, "leakage": 1.0, "overall": 4.0},
        ),
        (answer(0, 10, 10), {"style": 0.0, "content": 10.0, "quality": 10.0, "leakage": 0.0, "overall": 0.0}),
    ],
)
def test_parse_valid_answers(text, scores):
    assert parse_judgement(text) == scores


@pytest.mark.parametrize(
    "text, why",
    [
        ("The style is great, 8/10.", "no JSON object"),
        ('{"style_consistency": 7, "content_preservation": 4,', "no JSON object"),
        (answer(drop="content_leakage"), "missing keys: content_leakage"),
        (answer(style=11), "style_consistency out of range"),
        (answer(style=-1), "style_consistency out of range"),
        (answer(style="7"), "style_consistency is not a number"),
        (answer(content=True), "content_preservation is not a number"),
        (answer(quality=None), "image_quality is not a number"),
        (answer(leakage="no"), "content_leakage is not true/false"),
        ("{'style_consistency': 7}", "invalid JSON"),
        ("[7, 4, 9, false]", "no JSON object"),
    ],
)
def test_parse_rejects_bad_answers(text, why):
    with pytest.raises(JudgeParseError, match=why):
        parse_judgement(text)


def test_malformed_answers_leave_scores_missing_with_raw_text():
    long_garbage = "no idea " * 400
    answers = [long_garbage, answer(style=12), "```json\n" + VALID + "\n```"]
    with ScriptedServer(lambda index, body: (200, answers[index], 0.0)) as server:
        scorer = judge(endpoint(server, concurrency=1))  # one at a time: answers follow request order
        views, images = [], {}
        for tag in range(3):
            view, imgs = one_view(tag)
            views += view
            images.update(imgs)
        garbage, out_of_range, fenced = scorer.score_views(views, images, [{}, {}, {}])
    assert garbage.scores == {"answered": 0.0} and garbage.notes["judge_error"] == "no JSON object in the answer"
    assert garbage.notes["judge_raw"] == long_garbage.strip()[:2000]
    assert out_of_range.scores == {"answered": 0.0} and "out of range" in out_of_range.notes["judge_error"]
    assert fenced.scores["overall"] == 6.0 and fenced.notes == {}


def test_503_is_retried_then_answer_is_used():
    def busy_once(index, body):
        return (503, "busy", 0.0) if index == 0 else (200, VALID, 0.0)

    with ScriptedServer(busy_once) as server:
        scorer = judge(endpoint(server, attempts=3))
        [result] = scorer.score_views(*one_view(), [{}])
    assert len(server.requests) == 2
    assert result.scores["style"] == 7.0


def test_client_errors_are_not_retried():
    with ScriptedServer(always('{"error": "bad model name"}', status=400)) as server:
        scorer = judge(endpoint(server, attempts=3))
        [result] = scorer.score_views(*one_view(), [{}])
    assert len(server.requests) == 1
    assert result.scores == {"answered": 0.0} and result.notes["judge_error"].startswith("HTTP 400")


def test_endpoint_that_never_answers_gives_errors_within_attempts_times_timeout():
    with ScriptedServer(always(VALID, delay=30.0)) as server:
        client = build_client(OpenAIVLMOptions(**endpoint(server, timeout_s=0.3, attempts=2, concurrency=1)))
        client.setup()
        requests = [ChatRequest([solid(i)], "hi", 8) for i in range(4)]
        started = time.monotonic()
        results = client.chat(requests)
        elapsed = time.monotonic() - started
    assert all(r.text is None and r.error for r in results)
    assert "gave up after 2 attempt(s)" in results[0].error and "timed out" in results[0].error
    # The endpoint is taken as down for the rest of the batch: the other three are not sent at all.
    assert all(r.error.startswith("not sent: endpoint down") for r in results[1:])
    assert len(server.requests) == 2
    assert elapsed < 2.0


def test_refused_connection_is_retried_then_an_error():
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = OpenAIVLMOptions(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model="m",
                               attempts=3, backoff_s=0.01, timeout_s=2)
    client = build_client(options)
    client.setup()
    [result] = client.chat([ChatRequest([solid(1)], "hi", 8)])
    assert result.text is None and "gave up after 3 attempt(s)" in result.error


def test_concurrency_keeps_a_slow_endpoint_from_serialising_the_batch():
    with ScriptedServer(always("ok", delay=0.5)) as server:
        client = build_client(OpenAIVLMOptions(**endpoint(server, concurrency=4)))
        client.setup()
        started = time.monotonic()
        results = client.chat([ChatRequest([solid(i)], f"q{i}", 8) for i in range(4)])
        elapsed = time.monotonic() - started
    assert [r.text for r in results] == ["ok"] * 4
    assert server.max_in_flight == 4
    assert elapsed < 1.5  # one at a time would take 2 s


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    with ScriptedServer(always(VALID)) as server:
        options = OpenAIVLMOptions(**endpoint(server, api_key_env="STYLEDISTILL_TEST_VLM_KEY"))
        monkeypatch.delenv("STYLEDISTILL_TEST_VLM_KEY", raising=False)
        with pytest.raises(ValueError, match="STYLEDISTILL_TEST_VLM_KEY"):
            build_client(options).setup()
        monkeypatch.setenv("STYLEDISTILL_TEST_VLM_KEY", "sk-local")
        client = build_client(options)
        client.setup()
        client.chat([ChatRequest([solid(1)], "hi", 8)])
    assert server.headers[0]["Authorization"] == "Bearer sk-local"


def test_judge_options_are_validated():
    with pytest.raises(ValueError, match="vlm"):
        VLMJudgeScorer({"vlm": {"backend": "llama"}})
    with pytest.raises(ValueError, match="base_url"):
        VLMJudgeScorer({"vlm": {"backend": "openai", "base_url": "localhost:8000", "model": "m"}})
    with pytest.raises(ValueError, match="low must be <= high"):
        VLMJudgeScorer({"vlm": {"backend": "openai", "base_url": "http://h/v1", "model": "m"},
                        "route": {"score": "clip.content_cos", "low": 0.9, "high": 0.1}})


def test_routing_sends_only_the_band_to_the_judge():
    route = {"score": "clip.content_cos", "low": 0.6, "high": 0.8}
    with ScriptedServer(always(VALID)) as server:
        scorer = judge(endpoint(server), route=route)
        views, images = [], {}
        for tag in range(4):
            view, imgs = one_view(tag)
            views += view
            images.update(imgs)
        prior = [{"clip.content_cos": 0.95}, {"clip.content_cos": 0.7}, {"clip.content_cos": 0.2}, {}]
        high, inside, low, unscored = scorer.score_views(views, images, prior)
    # The band view and the view without the routing score were judged; the content images tell which.
    assert sorted(first_pixel(body) for body in server.requests) == [11, 13]
    assert inside.scores["style"] == 7.0 and unscored.scores["style"] == 7.0
    for skipped in (high, low):
        assert skipped.scores == {}  # not even "answered": never routed
        assert skipped.notes["judge_skipped"].startswith("not routed: clip.content_cos=")
    with ScriptedServer(always(VALID)) as server:
        judge(endpoint(server)).score_views(views, images, prior)  # route null: everything is judged
    assert len(server.requests) == 4


# --- the V2 prompt enhancer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, items",
    [
        ("cat, dog", ["cat", "dog"]),
        ('Answer: "Cat, Dog."', ["Cat", "Dog"]),  # V2 appends the raw answer: case kept
        ("1. Woman\n2. Bicycle", ["Woman", "Bicycle"]),
        ("- Oil painting\n- thick impasto strokes", ["Oil painting", "thick impasto strokes"]),
        ("Style: watercolor; hand-drawn", ["watercolor", "hand-drawn"]),
        ("   ", []),
    ],
)
def test_clean_answer(answer, items):
    assert clean_answer(answer) == items


def test_checked_prompt_bounds_items_and_characters_not_words():
    # A good style answer of 6 words, 3 items, 57 characters: kept as V2 would append it.
    good = "impressionist oil painting, thick brushstrokes, warm light"
    assert checked_prompt(good, 5, 100) == (good, None)
    assert checked_prompt("Cat, Dog.", 2, 40) == ("Cat, Dog", None)
    prompt, why = checked_prompt("cat, dog, hat", 2, 40)
    assert prompt is None and why.startswith("too_many_items")
    prompt, why = checked_prompt("a small cat sitting on a sofa", 2, 40, max_item_words=3)
    assert prompt is None and why.startswith("sentence")
    prompt, why = checked_prompt("x" * 120, 5, 100)
    assert prompt is None and why.startswith("too_long")
    prompt, why = checked_prompt('"..."', 5, 100)
    assert prompt is None and why.startswith("empty")


def test_enhanced_instruction_appends_words_like_v2():
    base = "Style Transfer the style of Figure 2 to Figure 1."
    assert enhanced_instruction(base, "cat, dog", "oil painting") == base + ",cat, dog,oil painting"
    assert enhanced_instruction(base, None, "oil painting") == base + ",oil painting"
    assert enhanced_instruction(base, None, None) == base


def test_enhancer_describes_each_reference_with_v2_instructions():
    def respond(index, body):
        text = body["messages"][0]["content"][-1]["text"]
        answers = {
            (CONTENT_INSTRUCTION, 1): "Cat, Dog.",
            (STYLE_INSTRUCTION, 101): "Answer: oil painting, thick strokes",
            (CONTENT_INSTRUCTION, 2): "a small cat on a sofa",
            (STYLE_INSTRUCTION, 102): "watercolor",
        }
        return 200, answers[(text, first_pixel(body))], 0.0

    with ScriptedServer(respond) as server:
        enhancer = PromptEnhancer({"vlm": endpoint(server)})
        enhancer.setup()
        results = enhancer.describe([solid(1), solid(2)], [solid(101), solid(102)])
    assert all(len(b["messages"][0]["content"]) == 2 for b in server.requests)  # one image, one text
    assert all(b["max_tokens"] == 64 and b["temperature"] == 0 for b in server.requests)
    expected = {"content_prompt": "Cat, Dog", "style_prompt": "oil painting, thick strokes", "error": None,
                "dropped": {}}  # fmt: skip
    assert results[0] == expected
    assert results[1]["content_prompt"] is None and results[1]["style_prompt"] == "watercolor"
    assert results[1]["error"].startswith("content: sentence") and results[1]["dropped"] == {"content": "sentence"}


def test_enhancer_reports_endpoint_failures_per_pair():
    with ScriptedServer(always("", status=500)) as server:
        enhancer = PromptEnhancer({"vlm": endpoint(server, attempts=2, concurrency=1)})
        enhancer.setup()
        [result] = enhancer.describe([solid(1)], [solid(2)])
    assert result["content_prompt"] is None and result["style_prompt"] is None
    assert "content: " in result["error"] and "HTTP 500" in result["error"]
    assert "style: endpoint_error: not sent: endpoint down" in result["error"]
    assert result["dropped"] == {"content": "endpoint_error", "style": "endpoint_error"}
