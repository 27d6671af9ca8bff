"""The run config: the packaged demo, --set overrides, one-line errors naming the field, paths and the hash."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from styledistill.schemas.config import V1_INSTRUCTION, ConfigError, RunConfig, load_config, parse_config

from conftest import DEMO_CONFIG

BASE = {"sources": [{"uri": "/data/realistic", "label": "realistic"},
                    {"uri": "/data/stylized", "label": "stylized"}]}


def config_error(data=BASE, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    return message


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_demo_config_loads():
    cfg = load_config(DEMO_CONFIG)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "demo"
    assert [(p.uri, p.label) for p in cfg.sources] == [
        (str(DEMO_CONFIG.parent / "sample-data/realistic"), "realistic"),
        (str(DEMO_CONFIG.parent / "sample-data/stylized"), "stylized"),
    ]
    assert cfg.plan.styles_per_photo == 2 and cfg.plan.triplets_per_photo == 4
    assert cfg.plan.samples_per_shard == 16
    assert cfg.plan.recipes == {"rns": 0.4, "sns": 0.3, "snr": 0.15, "rnr": 0.15}
    assert cfg.generator.backend == "magenta"
    assert [s.backend for s in cfg.scorers] == ["effnet", "edges", "magenta", "gram",
                                                "noop", "nsfw"]
    assert len(cfg.filters.rules) == 6
    assert cfg.filters.rules[1].recipes == ["rns", "sns", "snr"]
    assert cfg.stages.generate.batch_size == 4
    assert cfg.prompt.instruction == V1_INSTRUCTION


def test_overrides_set_nested_keys_with_yaml_types():
    cfg = load_config(DEMO_CONFIG, [
        "plan.seed=3",
        "plan.max_photos=null",
        "output.write_rejects=true",
        "plan.recipes={rns: 1, sns: 0.5}",
        "filters.rules.0.min=0.75",
        "stages.generate.num_gpus=0.5",
        "prompt.instruction='make it: blue'",  # quoted: a bare "a: b" would be a YAML mapping
        "sources.0.uri=/elsewhere/photos",
        "sources.1.label=classify",
        "labeler.backend=clip",
    ])
    assert cfg.plan.seed == 3 and isinstance(cfg.plan.seed, int)
    assert cfg.plan.max_photos is None
    assert cfg.output.write_rejects is True
    assert cfg.plan.recipes == {"rns": 1, "sns": 0.5}
    assert cfg.filters.rules[0].min == 0.75 and cfg.filters.rules[0].score == "effnet.content_cos"
    assert cfg.stages.generate.num_gpus == 0.5 and cfg.stages.generate.batch_size == 4
    assert cfg.prompt.instruction == "make it: blue"
    assert cfg.sources[0].uri == "/elsewhere/photos"
    assert cfg.sources[1].label == "classify" and cfg.sources[1].uri.endswith("sample-data/stylized")
    assert cfg.labeler is not None and cfg.labeler.backend == "clip"


def test_later_overrides_win_and_the_input_is_not_modified():
    data = {**BASE, "plan": {"seed": 1}}
    cfg = parse_config(data, ["plan.seed=2", "plan.seed=4"])
    assert cfg.plan.seed == 4
    assert data["plan"] == {"seed": 1}
    assert parse_config(data).plan.seed == 1


def test_a_value_containing_equals_signs():
    assert parse_config(BASE, ["prompt.instruction=a=b=c"]).prompt.instruction == "a=b=c"


@pytest.mark.parametrize("data,overrides,field", [
    ({**BASE, "bogus": 1}, [], "bogus"),
    (BASE, ["plan.bogus=1"], "plan.bogus"),
    (BASE, ["plan.styles_per_photo=1"], "plan.styles_per_photo"),
    (BASE, ["plan.triplets_per_photo=0"], "plan.triplets_per_photo"),
    (BASE, ["plan.recipes={rns: -0.1, sns: 1}"], "plan.recipes"),
    (BASE, ["plan.recipes={rns: 0, sns: 0}"], "plan.recipes"),
    (BASE, ["plan.recipes={rns: 1, xyz: 1}"], "plan.recipes.xyz"),
    (BASE, ["filters.rules=[{score: effnet.content_cos}]"], "filters.rules.0"),
    (BASE, ["filters.rules=[{score: a, min: 0.1}, {score: b, recipes: [rns]}]"], "filters.rules.1"),
    (BASE, ["filters.rules=[{score: a, min: 0.1, recipes: [xyz]}]"], "filters.rules.0.recipes.0"),
    (BASE, ["plan.seed=abc"], "plan.seed"),
    (BASE, ["sources.0.label=cartoon"], "sources.0.label"),
    (BASE, ["resolution.content_max_edge=null"], "resolution"),
    (BASE, ["output.image_format=gif"], "output.image_format"),
    (BASE, ["prompt.instruction=make it: blue"], "prompt.instruction"),  # unquoted "a: b" is a YAML mapping
    ({"sources": []}, [], "sources"),
    ({}, [], "sources"),
])
def test_invalid_config_is_one_line_naming_the_field(data, overrides, field):
    message = config_error(data, overrides)
    assert re.match(rf"config field {re.escape(field)}(\.\[key\])?: ", message), message


def test_several_errors_report_the_first_and_count_the_rest():
    message = config_error(BASE, ["plan.styles_per_photo=1", "plan.seed=x", "bogus=1"])
    assert message.startswith("config field ") and message.endswith("(and 2 more)"), message


def test_rule_without_bounds_says_what_it_needs():
    message = config_error(BASE, ["filters.generation_rules=[{score: nsfw.prob}]"])
    assert message.startswith("config field filters.generation_rules.0:")
    assert "'nsfw.prob' needs min, max or per_recipe" in message


@pytest.mark.parametrize("override,words", [
    ("plan.seed", "expected KEY=VALUE"),
    ("sources.x.uri=/a", "sources.x.uri=/a"),
    ("sources.5.uri=/a", "sources.5.uri=/a"),
])
def test_bad_override_syntax_is_one_line(override, words):
    message = config_error(BASE, [override])
    assert message.startswith(f"override {override!r}"), message
    assert words in message


@pytest.mark.parametrize("override", ["plan.seed=[", "plan.seed.a.b=1"])
def test_unparseable_override_is_a_config_error(override):
    with pytest.raises(ConfigError):
        load_config(DEMO_CONFIG, [override])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file not found: .*nope\.yaml$"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_non_mapping_top_level(tmp_path, text):
    with pytest.raises(ConfigError, match=r"^config file .*run\.yaml: expected a mapping at the top level$"):
        load_config(write(tmp_path, text))


def test_bad_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "sources: [{uri: a, label: realistic}\nplan: {seed: 1}\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as info:
        load_config(path)
    assert str(info.value).startswith(f"config file {path} is not valid YAML")


def test_bad_yaml_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "sources: [{uri: a, label: realistic}\nplan: {seed: 1}\n"))
    assert "\n" not in str(info.value)


def test_yaml_only_types_are_a_config_error(tmp_path):
    path = write(tmp_path, "name: 2024-01-01\nsources: [{uri: a, label: realistic}]\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_relative_sources_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    path = write(folder, "sources:\n"
                         "  - {uri: data/photos, label: realistic}\n"
                         "  - {uri: ../shared/styles.parquet, label: column}\n"
                         "  - {uri: /abs/styles, label: stylized}\n"
                         "  - {uri: 's3://bucket/styles/*.jpg', label: stylized}\n"
                         "  - {uri: 'gs://bucket/photos', label: realistic}\n")
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config(Path("project/configs/run.yaml"))
    assert [p.uri for p in cfg.sources] == [
        str(Path("project/configs") / "data/photos"),
        str(Path("project/configs") / "../shared/styles.parquet"),
        "/abs/styles",
        "s3://bucket/styles/*.jpg",
        "gs://bucket/photos",
    ]
    monkeypatch.chdir("/")
    assert Path(load_config(path).sources[0].uri) == folder / "data/photos"


def test_content_hash_ignores_where_and_how_but_not_what():
    base = parse_config(BASE)
    same = [
        "output.uri=s3://elsewhere/run",
        "ray.address=auto",
        "ray.max_shards_in_flight=9",
        "stages.generate.num_gpus=1",
        "stages.score.concurrency=4",
    ]
    for item in same:
        assert parse_config(BASE, [item]).content_hash() == base.content_hash(), item
    assert parse_config(BASE, same).content_hash() == base.content_hash()
    other = ["plan.seed=1", "plan.triplets_per_photo=3", "output.image_format=jpg", "generator.backend=telestyle",
             "filters.rules=[{score: a, min: 0.1}]", "sources.0.uri=/other"]
    hashes = {parse_config(BASE, [item]).content_hash() for item in other}
    assert len(hashes) == len(other) and base.content_hash() not in hashes
    assert parse_config(BASE, ["plan.seed=1"]).content_hash() == parse_config(BASE, ["plan.seed=1"]).content_hash()
    assert len(base.content_hash()) == 16 and int(base.content_hash(), 16) >= 0
