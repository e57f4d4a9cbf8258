"""What a run leaves on disk: `<output-dir>/<run-name>/` with run.json, metrics.jsonl and
peft_<round>/ adapters."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowertune_nlp import messages as wire
from flowertune_nlp.comm import BUDGET_MB, MB, CommLedger
from flowertune_nlp.config import AppConfig
from flowertune_nlp.io import (
    atomic_write_dir,
    atomic_write_figure,
    atomic_write_json,
    atomic_write_text,
)
from flowertune_nlp.names import model_slug

if TYPE_CHECKING:  # the launcher imports this module and needs no torch
    from collections.abc import Mapping, Sequence

    import torch

    from flowertune_nlp.round_driver import Assignment

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PACKAGES = ("flwr", "flwr-datasets", "torch", "transformers", "peft", "trl", "datasets",
            "bitsandbytes", "accelerate")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def default_run_name(config: AppConfig) -> str:
    return f"{model_slug(config.model.name)}-{time.strftime('%Y%m%d-%H%M%S')}"


def server_process() -> dict:
    """Which process writes a run: a later reader of a `running` run.json checks it is alive."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": psutil.Process().create_time()}


def current_status(record: dict) -> str:
    """A run's status as a reader should see it: `interrupted` for a `running` run whose
    ServerApp process (on this host) is gone, e.g. killed or out of memory."""
    import psutil

    status = record.get("status", "unknown")
    server = record.get("server") or {}
    if status != "running" or server.get("host") != socket.gethostname():
        return status
    try:
        process = psutil.Process(int(server["pid"]))
        alive = (process.create_time() == server.get("started")
                 and process.status() != psutil.STATUS_ZOMBIE)  # killed, not yet reaped
    except (psutil.Error, KeyError, TypeError, ValueError):
        alive = False
    return status if alive else "interrupted"


def read_status(record_file: Path) -> str | None:
    """The current status of the run whose run.json is `record_file`; None if unreadable."""
    try:
        return current_status(json.loads(Path(record_file).read_text()))
    except (OSError, ValueError, AttributeError):
        return None


def save_adapter(target: Path, state: dict[str, torch.Tensor], config: AppConfig,
                 card: str | None = None) -> None:
    """Write a PEFT adapter folder (adapter_config.json + safetensors, and the model card
    README.md when given), atomically.

    The server holds no model, so it writes the same two files `PeftModel.save_pretrained`
    would, with PEFT's own LoraConfig serializer and PEFT's key names; the base model is named
    as other tools resolve it (model_card.adapter_base_reference).
    """
    from safetensors.torch import save_file

    from flowertune_nlp.model_card import adapter_base_reference
    from flowertune_nlp.models import lora_config

    base = adapter_base_reference(config.model.name)

    def fill(staging: Path) -> None:
        lora = lora_config(config.model.lora)
        lora.base_model_name_or_path = base
        lora.save_pretrained(str(staging))
        if card is not None:
            (staging / "README.md").write_text(card)
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})

    atomic_write_dir(target, fill)


@dataclass
class RunOutputs:
    """The run folder and its bookkeeping files."""

    directory: Path
    config: AppConfig
    metrics: list[dict] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    tensorboard: Any = field(default=None, repr=False)  # SummaryWriter, with run.tensorboard

    @classmethod
    def create(cls, config: AppConfig) -> RunOutputs:
        name = config.run_name or default_run_name(config)
        directory = (Path(config.output_dir).expanduser() / name).resolve()
        if (directory / "run.json").exists():
            raise FileExistsError(
                f"run folder {directory} already holds a run; choose another run-name "
                "or remove the folder"
            )
        directory.mkdir(parents=True, exist_ok=True)
        outputs = cls(directory, config)
        outputs.record = {
            "run_name": name,
            "run_dir": str(directory),
            "status": "running",
            "server": server_process(),
            "seed": config.seed,
            "task": config.task,
            "config": config.to_dict(),
            "versions": package_versions(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "final_adapter": None,
            "adapters": {},
        }
        outputs.write_record()
        return outputs

    @classmethod
    def resume(cls, config: AppConfig, run_dir: Path, metrics: list[dict],
               changed_keys: list[str]) -> RunOutputs:
        """Reopen an earlier run's folder; metrics.jsonl is rewritten to the saved rounds, so
        rows of a round that was cut short do not appear twice."""
        record_file = run_dir / "run.json"
        try:
            record = json.loads(record_file.read_text())
            record["resumes"] = list(record.get("resumes", []))
        except (OSError, ValueError, AttributeError) as err:
            raise FileNotFoundError(f"{record_file} is missing or corrupt ({err}); it is not a "
                                    "resumable run folder") from None
        outputs = cls(run_dir, config, list(metrics), record)
        record["resumes"].append({
            "from_round": len(metrics),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "changed_keys": changed_keys,
            "previous_status": record.get("status"),
        })
        record.update(status="running", server=server_process(), config=config.to_dict(),
                      error=None)
        outputs.write_record()
        outputs.write_metrics()
        return outputs

    def write_json(self, name: str, data) -> None:
        atomic_write_json(self.directory / name, data)

    def write_record(self) -> None:
        atomic_write_json(self.directory / "run.json", self.record)

    def append_round(self, row: dict) -> None:
        """A federated round's row (`round_row`), in metrics.jsonl and the log."""
        self.append_metrics(row)
        heldout = ("" if "heldout_loss" not in row else
                   f", held-out loss {row['heldout_loss']:.4f} [{row['heldout_loss_ci_low']:.4f}"
                   f", {row['heldout_loss_ci_high']:.4f}]")
        log.info(
            "round %d: loss %s%s, %d clients (%d failed, %d rejected), comm %.2f MB this round, "
            "%.2f MB total (%.4f%% of the %.0f MB budget)", row["round"], row["train_loss"],
            heldout, row["clients"], row["failures"], row["rejected"], row["comm_mb_round"],
            row["comm_mb_total"], 100 * row["comm_mb_total"] / BUDGET_MB, BUDGET_MB,
        )

    def append_metrics(self, row: dict) -> None:
        self.metrics.append(row)
        self.write_metrics()
        if self.config.run.tensorboard:
            self.write_tensorboard(row)

    def write_tensorboard(self, row: dict) -> None:
        """The round's numeric metrics as TensorBoard scalars (step = round), for users who
        compare runs there (`tensorboard --logdir <output-dir>`)."""
        if self.tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(self.directory / "tensorboard"))
        for name, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "round":
                self.tensorboard.add_scalar(name, value, global_step=row["round"])
        self.tensorboard.flush()

    def write_metrics(self) -> None:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.metrics)
        atomic_write_text(self.directory / "metrics.jsonl", lines)

    def save_checkpoint(self, server_round: int, state: dict[str, torch.Tensor],
                        row: dict | None = None) -> Path:
        """peft_<round>/ with its model card (`row`: the round's metrics, for the card)."""
        from flowertune_nlp.model_card import model_card

        target = self.directory / f"peft_{server_round}"
        save_adapter(target, state, self.config, model_card(self.config, server_round, row))
        self.record["adapters"][str(server_round)] = str(target)
        self.record["final_adapter"] = str(target)
        self.write_record()
        return target

    def finish(self, status: str, **extra) -> None:
        self.record.update(status=status, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           **extra)
        if self.metrics:
            self.plot_losses()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.write_record()

    def plot_losses(self) -> None:
        """`loss.png`: the clients' train loss, the held-out loss (with its 95 % interval;
        round 0 = the base model) and the federated evaluation loss by round."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        trained = [r for r in self.metrics if r.get("train_loss") is not None]
        ax.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], marker="o",
                label="train (clients, example-weighted)")
        scored = ([{"round": 0, **self.record["heldout_base"]}]
                  if "heldout_base" in self.record else [])
        scored += [r for r in self.metrics if "heldout_loss" in r]
        if scored:
            rounds = [r["round"] for r in scored]
            ax.plot(rounds, [r["heldout_loss"] for r in scored], marker="s", label="held-out")
            if all("heldout_loss_ci_low" in r for r in scored):
                ax.fill_between(rounds, [r["heldout_loss_ci_low"] for r in scored],
                                [r["heldout_loss_ci_high"] for r in scored], alpha=0.2)
        federated = [r for r in self.metrics if r.get("federated_eval_loss") is not None]
        if federated:
            ax.plot([r["round"] for r in federated], [r["federated_eval_loss"] for r in federated],
                    marker="^", label="federated evaluation (clients' held-back rows)")
        ax.set(xlabel="round (0 = base model)", ylabel="mean token loss",
               title=self.directory.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write_figure(self.directory / "loss.png", fig)
        plt.close(fig)


def round_row(server_round: int, strategy: str, sent: Sequence[Assignment],
              client_metrics: Sequence[Mapping], precisions: list[str], failures: list[str],
              rejections: list[str], *, kept_previous: bool, ledger: CommLedger,
              learning_rate: float, privacy: dict) -> dict:
    """A federated round's metrics row, but for what the end of the round adds (held-out and
    federated evaluation): who trained what, the accepted replies' metrics, failures and
    rejections with their reasons, the communication so far and the privacy spent."""
    examples = [float(m[wire.NUM_EXAMPLES]) for m in client_metrics]
    return {
        "round": server_round,
        "partitions": [a.source.partition for a in sent if a.source.partition is not None],
        "sources": [a.source.label for a in sent],
        "nodes": [a.node.name for a in sent],
        "strategy": strategy,
        # example-weighted over the accepted replies, whatever the rule combines
        "train_loss": (sum(n * float(m[wire.TRAIN_LOSS]) for n, m in
                           zip(examples, client_metrics, strict=True)) / sum(examples)
                       if client_metrics else None),
        "clients": len(client_metrics),
        "failures": len(failures),
        "failure_reasons": failures,
        "rejected": len(rejections),
        "rejection_reasons": rejections,
        "kept_previous_global": kept_previous,
        "comm_bytes_round": ledger.round_bytes(server_round),
        "comm_bytes_total": ledger.total_bytes,
        "comm_mb_round": ledger.round_bytes(server_round) / MB,
        "comm_mb_total": ledger.total_bytes / MB,
        "examples": int(sum(examples)),
        "examples_dropped": int(sum(m[wire.EXAMPLES_DROPPED] for m in client_metrics)),
        "client_seconds_max": max((float(m[wire.SECONDS]) for m in client_metrics),
                                  default=0.0),
        "client_train_seconds_sum": sum(float(m[wire.TRAIN_SECONDS]) for m in client_metrics),
        "precision": precisions,
        "learning_rate": learning_rate,
        **privacy,
    }
