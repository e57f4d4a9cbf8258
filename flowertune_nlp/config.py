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
import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from flowertune_nlp.faults import Fault, parse_faults
from flowertune_nlp.names import PACKAGE_PREFIX, is_local_reference, resolve_package_file
from flowertune_nlp.tasks import ALIASES, DEFAULT_TASK, TASKS, get_task

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
    use_dora: bool = key("model.lora.use-dora", False,
                         "PEFT's DoRA: a magnitude vector per adapted layer travels with the "
                         "adapter (the server loads the base once to initialise it)")
    use_rslora: bool = key("model.lora.use-rslora", False,
                           "rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r")


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
    train_eos: bool = key("train.train-eos", True,
                          "the EOS after the response carries loss; false masks it out (the "
                          "published baseline, whose pad token is its EOS)")


STRATEGY_CHOICES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
                    "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "flexlora")
# The rule-specific keys and the rules that read them; any other rule refuses a non-default
# value, so a parameter set for the wrong rule is an error, not silently ignored.
RULE_KEYS = {
    "strategy.proximal-mu": ("fedprox",),
    "strategy.eta": ("fedadam", "fedyogi", "fedadagrad"),
    "strategy.beta-1": ("fedadam", "fedyogi"),
    "strategy.beta-2": ("fedadam", "fedyogi"),
    "strategy.tau": ("fedadam", "fedyogi", "fedadagrad"),
    "strategy.server-learning-rate": ("fedavgm",),
    "strategy.server-momentum": ("fedavgm",),
    "strategy.trim-fraction": ("fedtrimmedavg",),
    "strategy.num-malicious-nodes": ("krum", "multikrum", "bulyan"),
    "strategy.multikrum-select": ("multikrum",),
}
PRIVACY_MODES = ("off", "client-fixed", "server-fixed", "client-adaptive", "server-adaptive")


@dataclass(frozen=True)
class StrategySettings:
    name: str = key("strategy.name", "fedavg",
                    "aggregation rule: Flower's own strategies, or `flexlora` (SVD "
                    "re-projection of the averaged LoRA products)", *_choices(STRATEGY_CHOICES))
    fraction_train: float = key(
        "strategy.fraction-train", 0.0,
        "share of the data sources trained per round (Flower's rule, at least 1); 0: the "
        "task's leaderboard shape (0.1: 2 of 20 partitions; code 0.2)",
        lambda v: 0.0 <= v <= 1.0, "must be in (0, 1], or 0 for the task's own")
    fraction_evaluate: float = key(
        "strategy.fraction-evaluate", 0.0,
        "share of the data sources whose clients score the global adapter each round on their "
        "own held-back rows (federated evaluation; 0: none)", lambda v: 0.0 <= v <= 1.0,
        "must be in [0, 1]")
    proximal_mu: float = key("strategy.proximal-mu", 0.01,
                             "fedprox: weight mu of the client's proximal term (mu/2 times the "
                             "squared distance to the global adapter)",
                             lambda v: math.isfinite(v) and v >= 0, "must be >= 0")
    eta: float = key("strategy.eta", 1e-3,
                     "fedadam/fedyogi/fedadagrad: server optimiser step size (Flower's eta)",
                     lambda v: math.isfinite(v) and v > 0, "must be > 0")
    beta_1: float = key("strategy.beta-1", 0.9, "fedadam/fedyogi: first-moment decay",
                        lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
    beta_2: float = key("strategy.beta-2", 0.99, "fedadam/fedyogi: second-moment decay",
                        lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
    tau: float = key("strategy.tau", 1e-3,
                     "fedadam/fedyogi/fedadagrad: adaptivity (added to the root of the second "
                     "moment)", lambda v: math.isfinite(v) and v > 0, "must be > 0")
    server_learning_rate: float = key("strategy.server-learning-rate", 1.0,
                                      "fedavgm: server learning rate",
                                      lambda v: math.isfinite(v) and v > 0, "must be > 0")
    server_momentum: float = key("strategy.server-momentum", 0.9, "fedavgm: server momentum",
                                 lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
    trim_fraction: float = key("strategy.trim-fraction", 0.2,
                               "fedtrimmedavg: share cut from each end, per coordinate "
                               "(Flower's beta)", lambda v: 0.0 <= v < 0.5, "must be in [0, 0.5)")
    num_malicious_nodes: int = key("strategy.num-malicious-nodes", 1,
                                   "krum/multikrum/bulyan: attackers per round to tolerate",
                                   lambda v: v >= 0, "must be >= 0")
    multikrum_select: int = key("strategy.multikrum-select", 2,
                                "multikrum: updates averaged after selection", lambda v: v >= 1,
                                "must be >= 1")


@dataclass(frozen=True)
class PrivacySettings:
    mode: str = key("privacy.mode", "off",
                    "differential privacy by Flower's wrappers: `off`, `client-fixed`, "
                    "`server-fixed`, `client-adaptive`, `server-adaptive` (where the update is "
                    "clipped; fixed or adaptive clipping norm)", *_choices(PRIVACY_MODES))
    clipping_norm: float = key("privacy.clipping-norm", 1.0,
                               "L2 bound of each client's update (the initial one when adaptive)",
                               lambda v: math.isfinite(v) and v > 0, "must be > 0")
    noise_multiplier: float = key("privacy.noise-multiplier", 1.0,
                                  "Gaussian noise std / clipping norm, added to the sum",
                                  lambda v: math.isfinite(v) and v >= 0, "must be >= 0")
    target_delta: float = key("privacy.target-delta", 1e-5,
                              "delta at which the spent epsilon is reported",
                              lambda v: 0.0 < v < 1.0, "must be in (0, 1)")
    clipped_count_stddev: float = key(
        "privacy.clipped-count-stddev", 0.0,
        "adaptive modes: noise std of the count of clipped updates (Andrew et al.; 0: "
        "Flower's default, clients per round / 20)", lambda v: math.isfinite(v) and v >= 0,
        "must be >= 0")
    max_epsilon: float = key("privacy.max-epsilon", 0.0,
                             "stop before a round would spend more (0: no limit)",
                             lambda v: math.isfinite(v) and v >= 0, "must be >= 0 (0: no limit)")


PARTITIONER_CHOICES = ("iid", "dirichlet", "pathological", "exponential", "linear")


def _validation_size_ok(v: float) -> bool:
    return v == 0 or 0 < v < 1 or (v >= 1 and math.isfinite(v) and float(v).is_integer())


@dataclass(frozen=True)
class DatasetSettings:
    name: str = key("static.dataset.name", "",
                    "hub id, or a local .json/.jsonl/.parquet file or folder; empty: the "
                    "task's training set (`python -m flowertune_nlp.tasks list`)")
    num_partitions: int = key("static.dataset.num-partitions", 0,
                              "partitions of the dataset (the simulation's data sources); 0: "
                              "the task's leaderboard shape (20; finance 50, code 10)",
                              lambda v: v >= 0, "must be an integer >= 1, or 0 for the task's "
                              "own")
    partitioner: str = key(
        "static.dataset.partitioner", "iid",
        "flwr-datasets partitioner: `iid` (equal random shares), `dirichlet` (label mix per "
        "partition drawn from Dir(alpha)), `pathological` (each partition holds "
        "`classes-per-partition` labels), `exponential` / `linear` (size skew: partition i "
        "holds a share proportional to e^(i+1) or to i+1)", *_choices(PARTITIONER_CHOICES))
    partition_by: str = key(
        "static.dataset.partition-by", "",
        "label column of `dirichlet` / `pathological` and of the partition report; empty: the "
        "task type derived from the instruction (`data.task_type`)")
    dirichlet_alpha: float = key("static.dataset.dirichlet-alpha", 0.5,
                                 "`dirichlet`: concentration (smaller: more skewed label mixes)",
                                 lambda v: math.isfinite(v) and v > 0,
                                 "must be a finite number > 0")
    classes_per_partition: int = key("static.dataset.classes-per-partition", 2,
                                     "`pathological`: labels per partition", lambda v: v >= 1,
                                     "must be an integer >= 1")
    validation_size: float = key(
        "static.dataset.validation-size", 0.0,
        "rows held out (seeded, before partitioning; no client trains on them) for the "
        "server's validation loss: a row count, a fraction in (0, 1), or 0 for none",
        _validation_size_ok, "must be 0 (none), a fraction in (0, 1) or a whole number of "
        "rows >= 1")
    local_eval_share: float = key(
        "static.dataset.local-eval-share", 0.1,
        "with `strategy.fraction-evaluate` > 0: share of each client's own rows kept out of its "
        "training and scored in federated evaluation", lambda v: 0.0 < v < 1.0,
        "must be in (0, 1)")
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
    tensorboard: bool = key("run.tensorboard", False,
                            "also write each round's metrics as TensorBoard event files in "
                            "<run folder>/tensorboard/")
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
    task: str = key("task", DEFAULT_TASK,
                    "FlowerTune challenge: its training set, row format, federation shape and "
                    "evaluation suite", lambda v: v in TASKS,
                    f"allowed values are {', '.join(TASKS)} (or general-nlp)")
    run: RunSettings = field(default_factory=RunSettings)
    faults: tuple[Fault, ...] = key(
        "faults.inject", (), "deliberate faults for testing, see "
        "[Resume and faults](#resume-and-faults)")
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
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


def _leaves_its_folder(relative: str) -> bool:
    """Whether a relative path's `..` segments take it out of the folder it is relative to."""
    return os.path.normpath(relative).split(os.sep)[0] == ".."


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
    _check(not Path(config.run_name).is_absolute() and not _leaves_its_folder(config.run_name),
           "run-name", config.run_name, "the run folder must stay inside output-dir: give a "
           "folder name without a leading '/' or '..' segments that leave output-dir")
    _check(Path(config.output_dir).expanduser().is_absolute()
           or not _leaves_its_folder(config.output_dir), "output-dir", config.output_dir,
           "its '..' segments leave the folder you launch from; give an absolute path to "
           "write elsewhere")
    if config.run.resume:
        _check(Path(config.run.resume).expanduser().is_dir(), "run.resume", config.run.resume,
               "give the folder of an earlier run (the one holding run.json and state/)")
    bad_partitions = [f for f in config.faults
                      if f.partition is not None and not 0 <= f.partition < d.num_partitions]
    _check(not bad_partitions, "faults.inject", bad_partitions,
           f"partitions must be in [0, static.dataset.num-partitions = {d.num_partitions})")
    _validate_aggregation(config)
    for name, partitioner in (("static.dataset.dirichlet-alpha", "dirichlet"),
                              ("static.dataset.classes-per-partition", "pathological")):
        value = _lookup(config, KEYS[name].path)
        _check(d.partitioner == partitioner or value == KEYS[name].default, name, value,
               f"it is a parameter of the {partitioner} partitioner, not of "
               f"static.dataset.partitioner = {d.partitioner!r}; remove it or choose "
               f"{partitioner}")
    share = KEYS["static.dataset.local-eval-share"]
    _check(config.strategy.fraction_evaluate > 0 or d.local_eval_share == share.default,
           share.name, d.local_eval_share, "it has no effect with strategy.fraction-evaluate "
           "= 0; set a fraction of sources to evaluate, or remove it")
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


def clients_per_round(num_sources: int, fraction: float) -> int:
    """Flower's rule: int(n * fraction), at least 1, at most n."""
    return min(num_sources, max(1, int(num_sources * fraction)))


def planned_clients_per_round(config: AppConfig) -> int:
    """Train messages per round when every partition is served (a simulation)."""
    return clients_per_round(config.dataset.num_partitions, config.strategy.fraction_train)


def _validate_aggregation(config: AppConfig) -> None:
    """The rule's parameters belong to the rule; robust rules get the clients they need; the
    privacy mode's preconditions hold (Flower's accountant: plain averaging, fp32 clipping)."""
    s, p = config.strategy, config.privacy
    for name, rules in RULE_KEYS.items():
        spec = KEYS[name]
        value = _lookup(config, spec.path)
        _check(s.name in rules or value == spec.default, name, value,
               f"it is a parameter of {'/'.join(rules)}, not of strategy.name = {s.name!r}; "
               f"remove it or choose one of those rules")
    per_round = planned_clients_per_round(config)
    needed = {"krum": 2 * s.num_malicious_nodes + 3, "multikrum": 2 * s.num_malicious_nodes + 3,
              "bulyan": 4 * s.num_malicious_nodes + 3}.get(s.name, 1)
    _check(per_round >= needed, "strategy.num-malicious-nodes", s.num_malicious_nodes,
           f"{s.name} tolerating {s.num_malicious_nodes} attacker(s) needs at least {needed} "
           f"clients per round, but static.dataset.num-partitions = "
           f"{config.dataset.num_partitions} x strategy.fraction-train = {s.fraction_train} "
           f"gives {per_round}; raise strategy.fraction-train or lower the tolerance")
    if s.name == "multikrum":
        _check(s.multikrum_select <= per_round - s.num_malicious_nodes,
               "strategy.multikrum-select", s.multikrum_select,
               f"at most clients per round ({per_round}) - strategy.num-malicious-nodes")
    if p.mode == "off":
        for name in ("privacy.clipping-norm", "privacy.noise-multiplier",
                     "privacy.target-delta", "privacy.max-epsilon",
                     "privacy.clipped-count-stddev"):
            spec = KEYS[name]
            value = _lookup(config, spec.path)
            _check(value == spec.default, name, value,
                   'it has no effect with privacy.mode = "off"; choose a privacy mode or '
                   "remove it")
        return
    import importlib.util

    if importlib.util.find_spec("dp_accounting") is None:
        raise ConfigError(
            f"run config key 'privacy.mode' = {p.mode!r} needs Flower's privacy accountant, "
            "which is not installed: pip install \"flwr[dp]==1.42.0\" (scripts/setup_env.sh "
            "installs it)")
    _check(s.name in ("fedavg", "fedprox"), "strategy.name", s.name,
           f"privacy.mode = {p.mode!r}: Flower's DP wrappers calibrate the noise (std "
           "noise-multiplier x clipping-norm / clients) to a plain mean of the clipped updates, "
           "and its accountant assumes one; use fedavg or fedprox")
    if p.mode.endswith("fixed"):
        _check(p.target_delta == KEYS["privacy.target-delta"].default or p.noise_multiplier > 0,
               "privacy.target-delta", p.target_delta,
               "without noise no epsilon is accounted at any delta; add noise or remove it")
        _check(p.clipped_count_stddev == 0.0, "privacy.clipped-count-stddev",
               p.clipped_count_stddev, "only adaptive clipping counts clipped updates; use "
               "client-adaptive or server-adaptive, or remove it")
    else:
        _check(p.max_epsilon == 0.0, "privacy.max-epsilon", p.max_epsilon,
               f"Flower's adaptive clipping ({p.mode!r}) has no privacy accountant, so no "
               "epsilon budget can be enforced; use client-fixed or server-fixed")
        _check(p.target_delta == KEYS["privacy.target-delta"].default, "privacy.target-delta",
               p.target_delta, f"Flower's adaptive clipping ({p.mode!r}) accounts no epsilon "
               "at any delta; use client-fixed or server-fixed, or remove it")
        stddev = p.clipped_count_stddev or per_round / 20
        source = "" if p.clipped_count_stddev else ", Flower's default: clients per round / 20"
        _check(p.noise_multiplier < 2 * stddev, "privacy.clipped-count-stddev",
               p.clipped_count_stddev,
               f"adaptive clipping spends part of the noise on the clipped count: with "
               f"privacy.noise-multiplier = {p.noise_multiplier:g} it must be above "
               f"{p.noise_multiplier / 2:g} (it is {stddev:g}{source}); raise it or lower the "
               "noise")
    _check(p.noise_multiplier > 0 or p.max_epsilon == 0.0, "privacy.max-epsilon",
           p.max_epsilon, "with privacy.noise-multiplier = 0 no epsilon is finite; add noise "
           "or remove the budget")
    if p.mode.startswith("client"):
        _check(config.comm.transport == "fp32", "comm.transport", config.comm.transport,
               f"privacy.mode = {p.mode!r} clips each update on the client against the global "
               "adapter as received, in the wire dtype; fp16 rounding would break the "
               'clipping bound: use comm.transport = "fp32"')


def with_task_defaults(config: AppConfig) -> AppConfig:
    """Fill the keys left at "the task's own" (empty dataset name, 0 partitions, 0 fraction)
    from the task's definition (flowertune_nlp/tasks.py)."""
    task = get_task(config.task)
    dataset, strategy = config.dataset, config.strategy
    return dataclasses.replace(
        config, task=task.name,
        dataset=dataclasses.replace(dataset, name=dataset.name or task.dataset,
                                    num_partitions=dataset.num_partitions or task.num_partitions),
        strategy=dataclasses.replace(strategy,
                                     fraction_train=strategy.fraction_train or task.fraction_train))


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """", did you mean 'x'?" with the closest known names, or nothing when none is close."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def build_config(run_config: Mapping[str, Any]) -> AppConfig:
    """Build and validate the AppConfig from Flower's flat run config; keys left at the task's
    own take the task's values."""
    config = AppConfig()
    unknown = sorted(set(run_config) - set(KEYS))
    if unknown:
        raise ConfigError("; ".join(f"unknown run config key '{name}'{did_you_mean(name, KEYS)}"
                                    for name in unknown)
                          + " (`python -m flowertune_nlp.launch --list-keys` lists them all)")
    for name, value in run_config.items():
        spec = KEYS[name]
        value = _coerce(name, value, spec.kind)
        if name == "task":
            value = ALIASES.get(value, value)
        config = _replace_path(config, spec.path, value)
    _check(config.task in TASKS, "task", config.task, KEYS["task"].allowed)
    return validate(with_task_defaults(config))
