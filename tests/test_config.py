import tomllib
from pathlib import Path

import pytest

from flowertune_nlp.config import (
    KEYS,
    RUN_CONFIG_KEYS,
    AppConfig,
    ConfigError,
    build_config,
    markdown_table,
    planned_clients_per_round,
    toml_value,
    with_task_defaults,
)

ROOT = Path(__file__).resolve().parents[1]


def pyproject_run_config() -> dict:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flat: dict = {}

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            else:
                flat[name] = value

    walk("", data["tool"]["flwr"]["app"]["config"])
    return flat


def test_pyproject_defaults_equal_the_key_definitions():
    flat = pyproject_run_config()
    assert set(flat) == set(RUN_CONFIG_KEYS)
    assert {name: toml_value(spec.default) for name, spec in KEYS.items()} == flat
    assert build_config(flat) == with_task_defaults(AppConfig())
    assert build_config({}) == with_task_defaults(AppConfig())


@pytest.mark.parametrize(("task", "dataset", "partitions", "fraction", "per_round"), [
    ("general_nlp", "vicgalle/alpaca-gpt4", 20, 0.1, 2),
    ("general-nlp", "vicgalle/alpaca-gpt4", 20, 0.1, 2),
    ("finance", "flwrlabs/fingpt-sentiment-train", 50, 0.1, 5),
    ("medical", "flwrlabs/medical-meadow-medical-flashcards", 20, 0.1, 2),
    ("code", "flwrlabs/code-alpaca-20k", 10, 0.2, 2),
])
def test_a_task_brings_its_leaderboard_shape(task, dataset, partitions, fraction, per_round):
    config = build_config({"task": task})
    assert config.task == task.replace("-", "_")
    assert (config.dataset.name, config.dataset.num_partitions) == (dataset, partitions)
    assert config.strategy.fraction_train == fraction
    assert planned_clients_per_round(config) == per_round


def test_keys_set_by_the_user_win_over_the_task_shape():
    config = build_config({"task": "finance", "static.dataset.num-partitions": 4,
                           "strategy.fraction-train": 0.5, "static.dataset.name": "x/y"})
    assert (config.dataset.num_partitions, config.strategy.fraction_train) == (4, 0.5)
    assert config.dataset.name == "x/y"


def test_an_unknown_task_names_the_known_ones():
    with pytest.raises(ConfigError, match="run config key 'task'.*general_nlp, finance, "
                                          "medical, code"):
        build_config({"task": "legal"})


def test_documented_key_table_is_derived_from_the_key_definitions():
    assert markdown_table() in (ROOT / "docs" / "configuration.md").read_text()
    assert all(spec.help for spec in KEYS.values())


def test_baseline_defaults():
    c = build_config({})
    assert (c.num_server_rounds, c.model.name, c.model.quantization) == (
        10, "Qwen/Qwen2.5-7B-Instruct", 4)
    assert (c.model.lora.r, c.model.lora.alpha, c.train.seq_length) == (32, 64, 512)
    assert (c.train.batch_size, c.train.max_steps, c.strategy.fraction_train) == (8, 10, 0.1)


def test_presets_parse(tmp_path):
    for preset in sorted((ROOT / "configs").glob("*.toml")):
        overrides = tomllib.loads(preset.read_text())
        config = build_config(overrides)
        for name, value in overrides.items():  # every key the preset sets is applied as written
            applied = config
            for attribute in KEYS[name].path:
                applied = getattr(applied, attribute)
            assert toml_value(applied) == value, (preset.name, name)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("model.lora.peft-lora-r", 0, "rank must be > 0"),
        ("model.lora.peft-lora-r", -4, "rank must be > 0"),
        ("strategy.fraction-train", 1.5, "(0, 1]"),
        ("model.quantization", 5, "4 (nf4), 8 (int8) or 0"),
        ("model.precision", "fp8", "auto, bf16, fp32"),
        ("train.training-arguments.max-steps", 0, ">= 1"),
        ("train.training-arguments.per-device-train-batch-size", 0, ">= 1"),
        ("train.learning-rate-min", 1.0, "learning-rate-max"),
        ("model.name", "/no/such/model-dir", "does not exist"),
        ("model.name", "missing.gguf", "does not exist"),
        ("static.dataset.name", "/no/such/data.json", "does not exist"),
        ("model.name", "package:no_such_pkg/x.gguf", "not installed"),
        ("num-server-rounds", "ten", "expected int"),
        ("model.gradient-checkpointing", "maybe", "expected bool"),
        ("static.dataset.dirichlet-alpha", 0.0, "> 0"),
        ("static.dataset.dirichlet-alpha", -1.0, "> 0"),
        ("static.dataset.partitioner", "quantity", "iid, dirichlet, pathological"),
        ("static.dataset.classes-per-partition", 0, ">= 1"),
        ("static.dataset.validation-size", -1.0, "fraction in (0, 1)"),
        ("static.dataset.validation-size", 12.5, "whole number"),
        ("train.train-eos", "maybe", "expected bool"),
    ],
)
def test_bad_values_name_key_value_and_allowed(key, value, fragment):
    with pytest.raises(ConfigError) as info:
        build_config({key: value})
    message = str(info.value)
    assert key in message and repr(value) in message and fragment in message


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("run-name", "../elsewhere", "must stay inside output-dir"),
    ("run-name", "a/../../elsewhere", "must stay inside output-dir"),
    ("run-name", "/home/someone/.ssh", "must stay inside output-dir"),
    ("output-dir", "../results", "leave the folder you launch from"),
    ("output-dir", "results/../../x", "leave the folder you launch from"),
])
def test_run_folders_escaping_the_output_root_are_refused(key, value, fragment):
    with pytest.raises(ConfigError, match=f"'{key}' = {value!r} is invalid") as info:
        build_config({key: value})
    assert fragment in str(info.value)


def test_dot_dot_segments_that_stay_inside_are_accepted():
    config = build_config({"run-name": "sweep/a/../b", "output-dir": "out/../results"})
    assert (config.run_name, config.output_dir) == ("sweep/a/../b", "out/../results")
    assert build_config({"output-dir": "/tmp/a/../b"}).output_dir == "/tmp/a/../b"  # absolute


def test_unknown_key_is_rejected_with_known_keys():
    with pytest.raises(ConfigError, match="unknown run config key.*model.lora.rank"):
        build_config({"model.lora.rank": 8})


def test_target_modules_from_string():
    config = build_config({"model.lora.target-modules": "q_proj, k_proj,v_proj"})
    assert config.model.lora.target_modules == ("q_proj", "k_proj", "v_proj")
