"""Everything the next round depends on, saved after every round so a killed run resumes exactly.

`<run>/state/` holds the global adapter (`global_adapter.safetensors`), the aggregation rule's
arrays (`rule_state.safetensors`: optimiser moments, momentum) and `state.json`: the last
completed round, the config the run was started with, the communication ledger, the metrics
rows so far, the count of rounds in a row without a usable reply and the rule's other state
(adaptive clipping norm, privacy accountant, the DP noise secret). Client sampling and client
data order are functions of (seed, round) and the DP noise of (secret, round), so the seed in
the saved config and the secret are the whole random state. The folder is replaced atomically,
so it always describes one completed round, and is private (0700, files 0600): it may hold the
secret behind the DP noise, which must never be readable by others.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flowertune_nlp.adapter_fit import adapter_mismatch
from flowertune_nlp.comm import CommLedger
from flowertune_nlp.config import RUN_CONFIG_KEY_BY_PATH, AppConfig
from flowertune_nlp.io import atomic_write_dir

if TYPE_CHECKING:  # torch is imported where tensors are read: the launcher needs none
    import torch

STATE_DIR = "state"
STATE_FILE = "state.json"
ADAPTER_FILE = "global_adapter.safetensors"
RULE_FILE = "rule_state.safetensors"
FORMAT_VERSION = 2
# Config entries that decide the adapter's tensor names and shapes: resuming with another value
# cannot work. (config dict path, run-config key)
SHAPE_KEYS = (
    (("model", "name"), "model.name"),
    (("model", "lora", "r"), "model.lora.peft-lora-r"),
    (("model", "lora", "target_modules"), "model.lora.target-modules"),
    (("model", "lora", "use_dora"), "model.lora.use-dora"),
)

# Config entries that decide what the aggregation rule's saved state means.
RULE_IDENTITY_KEYS = (
    (("strategy", "name"), "strategy.name"),
    (("privacy", "mode"), "privacy.mode"),
)


class StateError(RuntimeError):
    """A saved run state cannot be resumed; the message names the file and the problem."""


@dataclass
class RoundState:
    server_round: int
    global_state: dict[str, torch.Tensor]
    config: dict[str, Any]
    ledger: CommLedger
    metrics: list[dict]
    empty_rounds: int
    rule_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    rule_values: dict[str, Any] = field(default_factory=dict)


def state_dir(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_DIR


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_round_state(run_dir: Path, state: RoundState) -> None:
    """Replace `<run>/state/` with this round's state (temp folder + fsync + rename)."""
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file

    def fill(staging: Path) -> None:
        adapter = staging / ADAPTER_FILE
        save_file({k: v.contiguous() for k, v in state.global_state.items()}, str(adapter))
        rule_file = staging / RULE_FILE
        save_numpy(state.rule_arrays, str(rule_file))
        record = {
            "format": FORMAT_VERSION,
            "round": state.server_round,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": state.config,
            "adapter": {
                "file": ADAPTER_FILE,
                "sha256": _sha256(adapter),
                "tensors": {k: list(v.shape) for k, v in state.global_state.items()},
            },
            "ledger": {"downloads": state.ledger.downloads, "uploads": state.ledger.uploads,
                       "evaluation": state.ledger.evaluation},
            "metrics": state.metrics,
            "empty_rounds": state.empty_rounds,
            "rule": {"sha256": _sha256(rule_file), "values": state.rule_values},
        }
        (staging / STATE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))

    atomic_write_dir(state_dir(run_dir), fill, private=True)


def load_round_state(run_dir: Path) -> RoundState:
    """Read and verify `<run>/state/`; raise StateError naming the file on any defect."""
    folder = state_dir(run_dir)
    state_file, adapter_file = folder / STATE_FILE, folder / ADAPTER_FILE
    if not state_file.is_file():
        raise StateError(f"{state_file} does not exist: {run_dir} holds no completed round to "
                         "resume from; start a new run instead")
    try:
        record = json.loads(state_file.read_text())
        server_round = int(record["round"])
        expected = record["adapter"]
        version = record["format"]
        if version != FORMAT_VERSION:
            raise StateError(f"{state_file} has state format {version}; this version of "
                             f"flowertune_nlp reads format {FORMAT_VERSION}")
        ledger = CommLedger(**{part: {int(k): int(v) for k, v in
                                      record["ledger"][part].items()}
                               for part in ("downloads", "uploads", "evaluation")})
        config, metrics = dict(record["config"]), list(record["metrics"])
        empty_rounds = int(record["empty_rounds"])
        rule_record = dict(record["rule"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise StateError(f"{state_file} is corrupt or truncated ({type(err).__name__}: {err}); "
                         "resume from a copy of the run folder or start a new run") from None
    if [row.get("round") for row in metrics] != list(range(1, server_round + 1)):
        raise StateError(f"{state_file} is inconsistent: its metrics do not cover rounds "
                         f"1..{server_round} exactly once")
    if not adapter_file.is_file():
        raise StateError(f"{adapter_file} is missing; the state cannot be resumed")
    if _sha256(adapter_file) != expected.get("sha256"):
        raise StateError(f"{adapter_file} does not match the checksum in {state_file} "
                         "(truncated or modified); the state cannot be resumed")
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(adapter_file))
    except Exception as err:  # safetensors raises its own error types
        raise StateError(f"{adapter_file} cannot be read: {err}") from None
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if shapes != expected.get("tensors"):
        raise StateError(f"{adapter_file} does not hold the tensors {state_file} lists")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise StateError(f"{adapter_file} has non-finite values in {bad[:3]}")
    rule_file = folder / RULE_FILE
    if not rule_file.is_file() or _sha256(rule_file) != rule_record.get("sha256"):
        raise StateError(f"{rule_file} is missing or does not match the checksum in "
                         f"{state_file}; the aggregation rule's state cannot be resumed")
    from safetensors.numpy import load_file as load_numpy

    return RoundState(server_round, tensors, config, ledger, metrics, empty_rounds,
                      load_numpy(str(rule_file)), dict(rule_record.get("values", {})))


def _lookup(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_resumable(state: RoundState, config: AppConfig, run_dir: Path) -> list[str]:
    """Refuse a state saved for other adapter shapes or with nothing left to do; return the
    other config keys whose values changed (the run continues, but not bit-for-bit)."""
    state_file = state_dir(run_dir) / STATE_FILE
    current = config.to_dict()
    for path, key in SHAPE_KEYS:
        saved, now = _normalise(_lookup(state.config, path)), _normalise(_lookup(current, path))
        if saved != now:
            raise StateError(
                f"{state_file} was saved with {key} = {saved!r}, but this run has {now!r}; the "
                "saved adapter's shapes only fit the original value. Resume with it, or start "
                "a new run"
            )
    for path, key in RULE_IDENTITY_KEYS:
        saved, now = _lookup(state.config, path), _lookup(current, path)
        if saved != now:
            raise StateError(
                f"{state_file} was saved with {key} = {saved!r}, but this run has {now!r}; the "
                "saved aggregation state (optimiser moments, momentum, privacy accountant) "
                "belongs to the original rule. Resume with it, or start a new run"
            )
    if config.privacy.mode != "off":
        # What Flower's accountant was built with; its saved releases only compose with it.
        saved_privacy, saved_dataset = state.config.get("privacy", {}), state.config.get(
            "dataset", {})
        for key, saved, now in (
                ("privacy.target-delta", saved_privacy.get("target_delta"),
                 config.privacy.target_delta),
                ("static.dataset.num-partitions", saved_dataset.get("num_partitions"),
                 config.dataset.num_partitions),
                ("privacy.noise-multiplier (zero or not)",
                 bool(saved_privacy.get("noise_multiplier")),
                 bool(config.privacy.noise_multiplier))):
            if saved != now:
                raise StateError(
                    f"{state_file} was saved with {key} = {saved!r}, but this run has {now!r}; "
                    "the privacy accountant's saved releases were accounted with the original "
                    "value. Resume with it (privacy.max-epsilon may change), or start a new run")
    if state.server_round >= config.num_server_rounds:
        raise StateError(
            f"{state_file}: the run already completed round {state.server_round} of "
            f"num-server-rounds = {config.num_server_rounds}; raise num-server-rounds to train "
            "further"
        )
    return sorted(_changed_keys(state.config, current, ()))


def _changed_keys(saved: dict, current: dict, prefix: tuple[str, ...]) -> list[str]:
    """Dotted names of config entries that differ, ignoring where outputs go and the resume
    and fault settings themselves."""
    ignored = {("run",), ("faults",), ("run_name",), ("output_dir",), ("num_server_rounds",)}
    changed = []
    for name in sorted(set(saved) | set(current)):
        path = (*prefix, name)
        if path in ignored:
            continue
        old, new = saved.get(name), current.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_keys(old, new, path)
        elif _normalise(old) != _normalise(new) and not (
            isinstance(old, float) and isinstance(new, float) and math.isclose(old, new)
        ):
            changed.append(RUN_CONFIG_KEY_BY_PATH.get(path, ".".join(path)))
    return changed


def check_adapter_fits(saved: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                       run_dir: Path, model_name: str) -> None:
    """The saved global adapter must have exactly the tensor names and shapes the model needs."""
    reason = adapter_mismatch(saved, expected)
    if reason:
        raise StateError(
            f"{state_dir(run_dir) / ADAPTER_FILE} does not fit {model_name} with this LoRA "
            f"config: {reason}; it was saved for another base model or other LoRA settings"
        )


def open_resumable(config: AppConfig) -> tuple[Path, RoundState, list[str]]:
    """Every check a resume needs, before anything is written: the saved state is intact, was
    saved for the same adapter shapes, has rounds left, and its adapter fits the base model.
    Returns the run folder, the state and the config keys that changed since it was saved."""
    from flowertune_nlp.models import adapter_shapes, resolve_model_path

    run_dir = Path(config.run.resume).expanduser().resolve()
    if not (run_dir / "run.json").is_file():
        raise StateError(f"{run_dir / 'run.json'} does not exist: run.resume must name the "
                         "folder of an earlier run")
    state = load_round_state(run_dir)
    changed = check_resumable(state, config, run_dir)
    expected = adapter_shapes(resolve_model_path(config.model.name), config.model.lora)
    check_adapter_fits(state.global_state, expected, run_dir, config.model.name)
    return run_dir, state, changed
