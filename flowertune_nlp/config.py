"""The one typed, validated view of the run config (`[tool.flwr.app.config]` + `--run-config`).

Flower hands the apps a flat mapping with dotted keys. Each key is defined once, on its dataclass
field (`key(...)`: name, default, help, check); the lookup table, the validation and the README's
table are derived from those definitions, and `tests/test_config.py` checks that pyproject.toml
and the README agree with them. Every key has a default because `flwr.simulation.run_simulation`
passes an empty run config. Validation happens before any model or data is loaded so a typo
costs a second, not a model download.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from flowertune_nlp.faults import Fault, parse_faults
from flowertune_nlp.names import PACKAGE_PREFIX, is_local_reference, resolve_package_file

QUANTIZATION_CHOICES = (0, 4, 8)
PRECISION_CHOICES = ("auto", "bf16", "fp32", "fp16")
LR_SCHEDULER_CHOICES = ("constant", "linear", "cosine")
PROMPT_TEMPLATE_CHOICES = ("alpaca", "chat")
TRANSPORT_CHOICES = ("fp32", "fp16")


class ConfigError(ValueError):
    """A run-config value is wrong; the message names the key, the value and what is allowed."""


def key(name: str, default: Any, help: str, check: Callable[[Any], bool] | None = None,
        allowed: str = "") -> Any:
    """A run-config key, defined once: its dotted name, default, one-line help, and the check
    (with the sentence that says what is allowed) `validate` applies. pyproject.toml's
    defaults and the README's table are checked against these definitions."""
    return field(default=default, metadata={"key": name, "help": help, "check": check,
                                            "allowed": allowed})


def _choices(options: tuple) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value in options), f"allowed values are {', '.join(map(str, options))}"


@dataclass(frozen=True)
class LoraSettings:
    r: int = key("model.lora.peft-lora-r", 32, "LoRA rank", lambda v: v > 0,
                 "the LoRA rank must be > 0")
    alpha: int = key("model.lora.peft-lora-alpha", 64, "LoRA alpha (scale alpha / r)",
                     lambda v: v > 0, "must be > 0")
    dropout: float = key("model.lora.peft-lora-dropout", 0.05, "LoRA dropout",
                         lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
    target_modules: tuple[str, ...] = key(
        "model.lora.target-modules", ("q_proj", "v_proj"), "comma-separated module names",
        lambda v: len(v) > 0, 'name at least one module, e.g. "q_proj,v_proj"')


@dataclass(frozen=True)
class ModelSettings:
    name: str = key("model.name", "Qwen/Qwen2.5-7B-Instruct",
                    "hub id, local folder, `.gguf` file, or `package:<pkg>/<file>`")
    quantization: int = key("model.quantization", 4, "4 (nf4, bf16 compute), 8, or 0",
                            lambda v: v in QUANTIZATION_CHOICES,
                            "allowed values are 4 (nf4), 8 (int8) or 0 (no quantization)")
    precision: str = key("model.precision", "auto",
                         "`auto` (bf16 where the hardware has it natively; on a GPU without it "
                         "fp16), `bf16`, `fp16` (CUDA only), `fp32`",
                         lambda v: v in PRECISION_CHOICES,
                         f"allowed values are {', '.join(PRECISION_CHOICES)} (fp16: CUDA only)")
    gradient_checkpointing: bool = key("model.gradient-checkpointing", True,
                                       "recompute activations in backward (less memory)")
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class TrainSettings:
    save_every_round: int = key("train.save-every-round", 5,
                                "checkpoint period (the last round is always saved)",
                                lambda v: v >= 1, "must be an integer >= 1")
    learning_rate_max: float = key("train.learning-rate-max", 5e-5,
                                   "cosine across rounds from this, constant inside a round",
                                   lambda v: math.isfinite(v) and v > 0,
                                   "must be a finite number > 0")
    learning_rate_min: float = key("train.learning-rate-min", 1e-6,
                                   "the last round's learning rate")
    seq_length: int = key("train.seq-length", 512, "max tokens per example", lambda v: v >= 16,
                          "must be an integer >= 16")
    batch_size: int = key("train.training-arguments.per-device-train-batch-size", 8,
                          "examples per step", lambda v: v >= 1, "must be an integer >= 1")
    gradient_accumulation_steps: int = key(
        "train.training-arguments.gradient-accumulation-steps", 1, "batches per optimizer step",
        lambda v: v >= 1, "must be an integer >= 1")
    max_steps: int = key("train.training-arguments.max-steps", 10, "local steps per round",
                         lambda v: v >= 1, "the number of local steps must be an integer >= 1")
    lr_scheduler_type: str = key("train.training-arguments.lr-scheduler-type", "constant",
                                 "schedule inside a round", *_choices(LR_SCHEDULER_CHOICES))


@dataclass(frozen=True)
class StrategySettings:
    fraction_train: float = key(
        "strategy.fraction-train", 0.1,
        "share of the data sources trained per round (Flower's rule, at least 1): 2 of 20 "
        "partitions", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
    fraction_evaluate: float = key("strategy.fraction-evaluate", 0.0,
                                   "share of nodes asked to evaluate (no evaluate handler yet)",
                                   lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")


@dataclass(frozen=True)
class DatasetSettings:
    name: str = key("static.dataset.name", "vicgalle/alpaca-gpt4",
                    "hub id, or a local .json/.jsonl/.parquet file or folder")
    num_partitions: int = key("static.dataset.num-partitions", 20,
                              "IID partitions of the dataset (the simulation's data sources)",
                              lambda v: v >= 1, "must be an integer >= 1")
    keep_input_field: bool = key("static.dataset.keep-input-field", True,
                                 "keep alpaca's `input` (the baseline drops it)")
    prompt_template: str = key(
        "static.dataset.prompt-template", "alpaca",
        "`alpaca` (the baseline's `### Instruction/### Response` prompt) or `chat` (the "
        "model's own chat template)", *_choices(PROMPT_TEMPLATE_CHOICES))


@dataclass(frozen=True)
class RunSettings:
    resume: str = key("run.resume", "",
                      "folder of an earlier run to continue from its last completed round")
    max_empty_rounds: int = key("run.max-empty-rounds", 3,
                                "stop (resumably) after this many rounds in a row without a "
                                "usable reply", lambda v: v >= 1, "must be an integer >= 1")


@dataclass(frozen=True)
class FederationSettings:
    min_nodes: int = key("federation.min-nodes", 1,
                         "connected nodes a round waits for before it starts", lambda v: v >= 1,
                         "must be an integer >= 1")
    wait_seconds: float = key("federation.wait-seconds", 300.0,
                              "how long it waits; then it runs with the nodes there are, or "
                              "stops (resumably) if none can train",
                              lambda v: math.isfinite(v) and v > 0,
                              "must be a number of seconds > 0")


@dataclass(frozen=True)
class CommSettings:
    transport: str = key("comm.transport", "fp32",
                         "dtype of the adapter on the wire; `fp16` halves the bytes (the server "
                         "averages and keeps fp32)", *_choices(TRANSPORT_CHOICES))


@dataclass(frozen=True)
class AppConfig:
    num_server_rounds: int = key("num-server-rounds", 10, "federated rounds", lambda v: v >= 1,
                                 "must be an integer >= 1")
    run_name: str = key("run-name", "", "run folder name (default `<model>-<timestamp>`)")
    output_dir: str = key("output-dir", "results",
                          "where run folders go (relative to where you launch)")
    seed: int = key("seed", 42, "client sampling, LoRA init, data order")
    run: RunSettings = field(default_factory=RunSettings)
    faults: tuple[Fault, ...] = key(
        "faults.inject", (), "deliberate faults for testing, see "
        "[Resume and faults](#resume-and-faults)")
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    comm: CommSettings = field(default_factory=CommSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class KeySpec:
    """A run-config key as the dataclasses define it."""

    name: str
    path: tuple[str, ...]  # attributes in AppConfig
    kind: Any  # int, float, str, bool, tuple[str, ...] or tuple[Fault, ...]
    default: Any
    help: str
    check: Callable[[Any], bool] | None
    allowed: str


def _key_specs(cls: type, path: tuple[str, ...] = ()) -> list[KeySpec]:
    hints = get_type_hints(cls)
    specs = []
    for item in dataclasses.fields(cls):
        if "key" in item.metadata:
            meta = item.metadata
            specs.append(KeySpec(meta["key"], (*path, item.name), hints[item.name], item.default,
                                 meta["help"], meta["check"], meta["allowed"]))
        else:
            specs += _key_specs(hints[item.name], (*path, item.name))
    return specs


KEYS: dict[str, KeySpec] = {spec.name: spec for spec in _key_specs(AppConfig)}
RUN_CONFIG_KEYS = tuple(KEYS)
# AppConfig attribute path -> run-config key, to name keys the way users write them
RUN_CONFIG_KEY_BY_PATH = {spec.path: spec.name for spec in KEYS.values()}


def toml_value(value: Any) -> Any:
    """A key's value as written in pyproject.toml / a run config (comma-separated lists)."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return value


def markdown_table() -> str:
    """The README's table of keys, derived from the definitions."""
    def shown(value: Any) -> str:
        value = toml_value(value)
        if isinstance(value, bool):
            return str(value).lower()
        return f"`{value}`" if isinstance(value, str) and value else (
            '`""`' if value == "" else str(value))

    rows = [f"| `{s.name}` | {shown(s.default)} | {s.help} |" for s in KEYS.values()]
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows])


def _coerce(key: str, value: Any, kind: Any) -> Any:
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
    elif kind == tuple[Fault, ...]:
        if isinstance(value, str):
            try:
                return parse_faults(value)
            except ValueError as err:
                raise ConfigError(f"run config key '{key}' = {value!r}: {err}") from None
    elif get_origin(kind) is tuple:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, (list, tuple)):
            return tuple(str(part) for part in value)
    name = "comma-separated names" if get_origin(kind) is tuple else kind.__name__
    raise ConfigError(f"run config key '{key}' = {value!r}: expected {name}")


def _replace_path(config: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(config, **{path[0]: value})
    child = getattr(config, path[0])
    return dataclasses.replace(config, **{path[0]: _replace_path(child, path[1:], value)})


def _lookup(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"run config key '{key}' = {value!r} is invalid: {allowed}")


def validate(config: AppConfig) -> AppConfig:
    """Raise ConfigError on the first invalid value; return the config unchanged otherwise.
    Each key's own check comes with its definition; the checks here involve several keys or
    the file system."""
    for spec in KEYS.values():
        if spec.check is not None:
            value = _lookup(config, spec.path)
            _check(spec.check(value), spec.name, value, spec.allowed)
    m, t, d = config.model, config.train, config.dataset
    _check(math.isfinite(t.learning_rate_min) and 0 <= t.learning_rate_min <= t.learning_rate_max,
           "train.learning-rate-min", t.learning_rate_min,
           f"must be in [0, train.learning-rate-max = {t.learning_rate_max}]")
    if config.run.resume:
        _check(Path(config.run.resume).expanduser().is_dir(), "run.resume", config.run.resume,
               "give the folder of an earlier run (the one holding run.json and state/)")
    bad_partitions = [f for f in config.faults
                      if f.partition is not None and not 0 <= f.partition < d.num_partitions]
    _check(not bad_partitions, "faults.inject", bad_partitions,
           f"partitions must be in [0, static.dataset.num-partitions = {d.num_partitions})")
    for key, name in (("model.name", m.name), ("static.dataset.name", d.name)):
        if is_local_reference(name) and not name.startswith(PACKAGE_PREFIX):
            _check(Path(name).expanduser().exists(), key, name,
                   "this local path does not exist; give an existing file/folder or a hub id")
    if m.name.startswith(PACKAGE_PREFIX):
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
    unknown = sorted(set(run_config) - set(KEYS))
    if unknown:
        raise ConfigError(
            f"unknown run config key(s) {', '.join(unknown)}; known keys: {', '.join(KEYS)}"
        )
    for name, value in run_config.items():
        spec = KEYS[name]
        config = _replace_path(config, spec.path, _coerce(name, value, spec.kind))
    return validate(config)
