"""Helpers for tests that run the app through a real `flwr run` (local simulation, Ray)."""

from __future__ import annotations

from pathlib import Path

import psutil

FLOWER_PROCESSES = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet",
                    "gcs_server", "ray::")


def flower_processes() -> list[str]:
    """Command lines of every Flower or Ray process still running (a test must leave none)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(
                name in cmdline for name in FLOWER_PROCESSES):
            found.append(cmdline[:120])
    return found


def tiny_settings(model_dir: Path, data: Path, out: Path, name: str, rounds: int = 2,
                  **extra) -> dict:
    """Two short rounds on the tiny model and a local dataset, as a run-config mapping (for TOML
    files and `run_app`)."""
    return {
        "num-server-rounds": rounds, "model.name": str(model_dir), "model.quantization": 0,
        "static.dataset.name": str(data), "train.seq-length": 128,
        "train.save-every-round": 1, "train.training-arguments.max-steps": 2,
        "train.training-arguments.per-device-train-batch-size": 2,
        "output-dir": str(out), "run-name": name, **extra,
    }


def tiny_run_config(model_dir: Path, data: Path, out: Path, name: str, rounds: int = 2,
                    extra: str = "") -> list:
    """`tiny_settings` plus `key=value` overrides, as `run_app` takes them."""
    return [tiny_settings(model_dir, data, out, name, rounds), extra]
