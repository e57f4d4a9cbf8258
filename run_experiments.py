"""Sweep models x tasks: train each model through `flwr run`, evaluate its final adapter on the
task's benchmark, and write one results table (CSV, JSON, Markdown) plus plots. With
`--baseline centralized,local` each model is also trained without a federation on the pooled
data and by single data holders alone (flowertune_nlp.baselines), and the base model, local,
federated and centralized training appear side by side, with their held-out losses.

Everything is read from files the runs write (run.json, metrics.jsonl, the evaluation JSON),
never scraped from output. A failed model is recorded and the sweep goes on; re-running the same
--run-id skips pairs that already completed (unless --force).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import tomli_w

from evaluation.mmlu import CATEGORY_TITLES, LEADERBOARD_CATEGORIES
from flowertune_nlp.baselines import KINDS as BASELINE_KINDS
from flowertune_nlp.baselines import local_partitions
from flowertune_nlp.config import build_config
from flowertune_nlp.flower_home import QUIET_ENVIRONMENT
from flowertune_nlp.io import atomic_write_figure, atomic_write_json, atomic_write_text
from flowertune_nlp.names import model_slug
from flowertune_nlp.outputs import current_status, read_status
from flowertune_nlp.processes import stop_process_tree
from flowertune_nlp.run_config import merge_run_configs

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"
TASKS_FILE = ROOT / "tasks.toml"
CHILD_STOP_SECONDS = 60.0  # a stopped launcher's own clean-up takes a few seconds
CATEGORY_COLUMNS = tuple((key, CATEGORY_TITLES[key]) for key in LEADERBOARD_CATEGORIES)


_sweep_log: Path | None = None


def say(message: str) -> None:
    """Print and append to the sweep's own log in its run folder."""
    print(message, flush=True)
    if _sweep_log is not None:
        with _sweep_log.open("a") as log:
            log.write(message + "\n")


class UsageError(Exception):
    """A bad argument: reported with exit code 2 before anything runs."""


def load_tasks() -> dict:
    return tomllib.loads(TASKS_FILE.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="base model: hub id, local folder, GGUF file or package:<pkg>/<file>;"
                        " repeat the flag or separate with commas")
    parser.add_argument("--task", default="general_nlp",
                        help=f"task from {TASKS_FILE.name}: {', '.join(load_tasks())}")
    parser.add_argument("--preset", default=None,
                        help="a configs/<name>.toml run-config preset, e.g. cpu-smoke")
    parser.add_argument("--run-config", action="append", default=[],
                        help="extra 'key=value' run-config overrides passed to flwr run")
    parser.add_argument("--data-dir", default=None,
                        help="offline data laid out like ../shared/data: alpaca-gpt4/*.json, "
                        "mmlu/test/*.csv, mmlu/dev/*.csv; also turns the hub off")
    parser.add_argument("--eval-only", action="store_true",
                        help="skip training; evaluate the adapter an earlier training of this "
                        "run id recorded (or --peft-path)")
    parser.add_argument("--peft-path", default=None, help="adapter to evaluate with --eval-only")
    parser.add_argument("--protocol", default="flowertune,logprob",
                        help="evaluation protocols: flowertune, logprob or both")
    parser.add_argument("--limit-per-subject", type=int, default=None,
                        help="MMLU questions per subject (default: the task table's value for "
                        "the preset, else all)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--baseline", default="",
                        help="also train and evaluate these baselines with the same config: "
                        "centralized, local (comma-separated); needs "
                        "static.dataset.validation-size")
    parser.add_argument("--local-partitions", default=None,
                        help="`local` baseline: the partitions that each train alone "
                        "(default: the baselines' own, 0,1,2); each costs a federated run's "
                        "training time")
    parser.add_argument("--run-id", default=None, help="sweep folder name (default: a timestamp)")
    parser.add_argument("--force", action="store_true",
                        help="redo pairs that already completed in this run id")
    parser.add_argument("--resume", action="store_true",
                        help="continue unfinished pairs of this --run-id where they stopped: "
                        "training from its last saved round, evaluation of a finished training")
    parser.add_argument("--output-root", default=str(ROOT / "experiment_results"),
                        help="where <task>/<run-id>/ folders go")
    args = parser.parse_args(argv)
    args.model = [m.strip() for spec in args.model for m in spec.split(",") if m.strip()]
    return args


def validate(args: argparse.Namespace) -> dict:
    """Check every argument before anything runs; returns the task's table."""
    tasks = load_tasks()
    if args.task not in tasks:
        raise UsageError(f"unknown task {args.task!r}; known tasks: {', '.join(tasks)}")
    if not args.model:
        raise UsageError("--model is empty")
    if args.preset is not None and not (CONFIGS / f"{args.preset}.toml").is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.toml"))
        raise UsageError(f"unknown preset {args.preset!r}; known presets: {', '.join(known)}")
    task = tasks[args.task]
    if args.data_dir is not None:
        data = Path(args.data_dir).expanduser()
        for sub in (task["local-dataset"], f"{task['local-benchmark']}/test"):
            if not (data / sub).is_dir():
                raise UsageError(f"--data-dir {data} has no {sub}/ folder; lay it out like "
                                 "../shared/data (alpaca-gpt4/*.json, mmlu/test/*.csv)")
    if args.eval_only and args.peft_path and not Path(args.peft_path).is_dir():
        raise UsageError(f"--peft-path {args.peft_path} is not a folder")
    if args.limit_per_subject is not None and args.limit_per_subject < 1:
        raise UsageError(f"--limit-per-subject {args.limit_per_subject} is not >= 1; omit it to "
                         "score every question")
    if args.resume and not args.run_id:
        raise UsageError("--resume needs the --run-id of the sweep to continue")
    if args.resume and (args.eval_only or args.force):
        raise UsageError("--resume cannot be combined with --eval-only or --force")
    if args.eval_only and args.peft_path and len(args.model) != 1:
        raise UsageError("--peft-path with --eval-only takes exactly one --model")
    if args.run_id and not re.fullmatch(r"[A-Za-z0-9._-]+", args.run_id):
        raise UsageError(f"--run-id {args.run_id!r} may only hold letters, digits, . _ -")
    unknown = [k for k in baselines(args) if k not in BASELINE_KINDS]
    if unknown:
        raise UsageError(f"--baseline {','.join(unknown)}: unknown; choose from "
                         f"{', '.join(BASELINE_KINDS)}")
    if args.local_partitions is not None and "local" not in baselines(args):
        raise UsageError("--local-partitions chooses the local baseline's data holders: add "
                         "--baseline local")
    if baselines(args):
        try:
            config = build_config(merge_run_configs(run_configs(args)))
            if args.local_partitions is not None:
                local_partitions(args.local_partitions, config.dataset.num_partitions)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if not config.dataset.validation_size:
            raise UsageError("--baseline compares held-out losses: add "
                             "--run-config static.dataset.validation-size=<rows>")
    return task


def baselines(args: argparse.Namespace) -> list[str]:
    return [kind.strip() for kind in args.baseline.split(",") if kind.strip()]


def run_configs(args: argparse.Namespace) -> list[str]:
    """The preset and the --run-config overrides, as the launcher and the baselines take them."""
    preset = [str(CONFIGS / f"{args.preset}.toml")] if args.preset else []
    return preset + list(args.run_config)


def environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, **QUIET_ENVIRONMENT, PYTHONUNBUFFERED="1")
    if args.data_dir is not None:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def run_logged(command: list[str], log_file: Path, env: dict[str, str]) -> int:
    """Run `command`, its output appended to `log_file`. If the sweep is stopped meanwhile
    (Ctrl-C, SIGTERM), the command and everything it started (the launcher's SuperLink, Ray)
    are stopped too: subprocess.run would SIGKILL the launcher alone and orphan them."""
    with log_file.open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 cwd=ROOT)
        try:
            return child.wait()
        except BaseException:
            stop_process_tree(child, grace=CHILD_STOP_SECONDS)
            raise


def task_source(args, task: dict, key: str) -> str:
    """The task's `key` source: its folder under --data-dir offline, else its hub id."""
    if args.data_dir:
        return str(Path(args.data_dir).resolve() / task[f"local-{key}"])
    return task[key]


def train(model: str, args, task: dict, pair_dir: Path, env, resume: bool) -> dict:
    """Train through the launcher; with `resume`, continue the pair's saved run instead."""
    run_dir = pair_dir / "train"
    record_file = run_dir / "run.json"
    log_file = pair_dir / "train.log"
    seconds = 0.0
    if not (resume and read_status(record_file) == "completed"):
        # The pair's own settings go in a TOML file: no quoting of paths or model names.
        overrides = {"model.name": model, "static.dataset.name": task_source(args, task, "dataset"),
                     "output-dir": str(pair_dir), "run-name": run_dir.name}
        if resume:
            overrides["run.resume"] = str(run_dir)
        overrides_file = pair_dir / "run-config.toml"
        atomic_write_text(overrides_file, tomli_w.dumps(overrides))
        command = [sys.executable, "-m", "flowertune_nlp.launch"]
        for item in [*run_configs(args), str(overrides_file)]:
            command += ["--run-config", item]
        start = time.perf_counter()
        code = run_logged(command, log_file, env)
        seconds = time.perf_counter() - start
        if not record_file.is_file():
            errors = [line for line in log_file.read_text().splitlines()
                      if line.startswith("error:")]
            reason = errors[-1] if errors else "training wrote no run.json"
            raise RuntimeError(f"{reason} (exit {code}); see {log_file}")
    else:
        code = 0
        say(f"[{model}] training already completed; evaluating its adapter")
    record = json.loads(record_file.read_text())
    status = current_status(record)
    if code != 0 or status != "completed" or not record.get("final_adapter"):
        hint = (f"; continue with --resume --run-id {pair_dir.parent.name}"
                if (run_dir / "state").is_dir() else "")
        raise RuntimeError(f"training {status}: {record.get('error')}; "
                           f"see {log_file}{hint}")
    return {"train_seconds": seconds, "adapter": record["final_adapter"],
            "rounds": record.get("rounds"), "comm_mb": record.get("comm_mb_total"),
            "metrics_file": str(run_dir / "metrics.jsonl")}


def train_baseline(model: str, kind: str, args, task: dict, pair_dir: Path, env) -> dict:
    """Train a baseline (flowertune_nlp.baselines) with the federated run's config; a completed
    one (an earlier attempt of a resumed sweep) is reused, an incomplete one moved aside."""
    run_dir = pair_dir / kind
    record_file = run_dir / "run.json"
    if read_status(record_file) == "completed":
        say(f"[{model}] {kind} baseline already completed")
        record = json.loads(record_file.read_text())
        return {"train_seconds": 0.0, "adapter": record["final_adapter"],
                "metrics_file": str(run_dir / "metrics.jsonl"), "comm_mb": 0.0}
    if run_dir.exists():
        run_dir.rename(run_dir.with_name(f"{kind}.attempt-{time.strftime('%H%M%S')}"))
    overrides_file = pair_dir / "run-config.toml"  # written by `train`
    command = [sys.executable, "-m", "flowertune_nlp.baselines", "--kind", kind,
               "--output", str(run_dir)]
    if kind == "local" and args.local_partitions is not None:
        command += ["--local-partitions", args.local_partitions]
    for item in [*run_configs(args), str(overrides_file)]:
        command += ["--run-config", item]
    log_file = pair_dir / f"{kind}.log"
    start = time.perf_counter()
    code = run_logged(command, log_file, env)
    if code != 0 or read_status(record_file) != "completed":
        raise RuntimeError(f"{kind} baseline failed (exit {code}); see {log_file}")
    record = json.loads(record_file.read_text())
    return {"train_seconds": time.perf_counter() - start, "adapter": record["final_adapter"],
            "metrics_file": str(run_dir / "metrics.jsonl"), "comm_mb": 0.0}


def evaluate(model: str, adapter: str | None, args, task: dict, pair_dir: Path, env,
             setup: str = "federated") -> dict:
    """MMLU of the model with `adapter` (None: the base model alone)."""
    benchmark = task_source(args, task, "benchmark")
    limit = args.limit_per_subject
    if limit is None and args.preset:
        limit = task.get("evaluation", {}).get("limit-per-subject", {}).get(args.preset)
    suffix = "" if setup == "federated" else f"-{setup}"
    output = pair_dir / f"eval{suffix}.json"
    command = [sys.executable, "-m", "evaluation", "--base-model-name-path", model,
               "--mmlu-path", benchmark, "--category",
               task["categories"], "--protocol", args.protocol, "--batch-size",
               str(args.eval_batch_size), "--run-name", model_slug(model), "--output", str(output),
               "--no-progress"]
    if adapter:
        command += ["--peft-path", adapter]
    if limit:
        command += ["--limit-per-subject", str(limit)]
    log_file = pair_dir / f"eval{suffix}.log"
    start = time.perf_counter()
    code = run_logged(command, log_file, env)
    if code != 0 or not output.is_file():
        raise RuntimeError(f"evaluation failed (exit {code}); see {log_file}")
    return {"eval_seconds": time.perf_counter() - start, "eval_file": str(output),
            "limit_per_subject": limit}


def run_pair(model: str, args, task: dict, sweep_dir: Path, env) -> dict:
    pair_dir = sweep_dir / model_slug(model)
    state_file = pair_dir / "pair.json"
    previous = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if previous.get("status") == "completed" and not args.force:
        say(f"[{model}] already completed in this run id; skipping (use --force to redo)")
        return previous
    resume = args.resume and (pair_dir / "train" / "run.json").is_file()
    if pair_dir.exists() and not args.eval_only and not resume:
        # Keep what an earlier attempt wrote; a new training needs a fresh folder.
        pair_dir.rename(pair_dir.with_name(f"{pair_dir.name}.attempt-{time.strftime('%H%M%S')}"))
    pair_dir.mkdir(parents=True, exist_ok=True)
    state = {"model": model, "task": args.task, "status": "running", "pair_dir": str(pair_dir)}
    try:
        if args.eval_only:
            adapter = args.peft_path or previous.get("adapter")
            if not adapter:
                raise RuntimeError("--eval-only found no adapter for this model in this run id; "
                                   "train first or pass --peft-path")
            state.update({k: v for k, v in previous.items() if k not in state})
            state["adapter"] = adapter
        else:
            say(f"[{model}] {'resuming ' if resume else ''}training "
                f"(log: {pair_dir / 'train.log'})")
            state.update(train(model, args, task, pair_dir, env, resume))
            if resume:  # an earlier attempt's training time, where it finished training
                state["train_seconds"] += previous.get("train_seconds", 0.0)
        say(f"[{model}] evaluating {state['adapter']} (log: {pair_dir / 'eval.log'})")
        state.update(evaluate(model, state["adapter"], args, task, pair_dir, env))
        if baselines(args) and not args.eval_only:  # --eval-only keeps the earlier setups
            state["setups"] = {"base": {"heldout_from": str(pair_dir / "train" / "run.json"),
                                        **evaluate(model, None, args, task, pair_dir, env,
                                                   "base")}}
            for kind in baselines(args):
                say(f"[{model}] {kind} baseline (log: {pair_dir / f'{kind}.log'})")
                setup = train_baseline(model, kind, args, task, pair_dir, env)
                setup.update(evaluate(model, setup["adapter"], args, task, pair_dir, env, kind))
                state["setups"][kind] = setup
        state["status"] = "completed"
    except Exception as err:  # one broken pair (a corrupt run.json, a crash) is recorded
        # as failed, and the sweep goes on with the other models
        reason = str(err) if isinstance(err, RuntimeError) else f"{type(err).__name__}: {err}"
        state.update(status="failed", error=reason)
        say(f"[{model}] FAILED: {reason}")
    atomic_write_json(state_file, state)
    return state


def heldout_cell(metrics_file: str | None, run_file: str | None = None) -> str | None:
    """The held-out loss [95 % CI] after the last round (or of the base model in run.json)."""
    if run_file:
        scored = json.loads(Path(run_file).read_text()).get("heldout_base")
    elif metrics_file and Path(metrics_file).is_file():
        scored = json.loads(Path(metrics_file).read_text().splitlines()[-1])
    else:
        return None
    if not scored or "heldout_loss" not in scored:
        return None
    if "heldout_loss_min" in scored:  # local training: mean over the holders and their range
        return (f"{scored['heldout_loss']:.4f} (range {scored['heldout_loss_min']:.4f}–"
                f"{scored['heldout_loss_max']:.4f} over "
                f"{len(scored['heldout_loss_per_source'])} holders)")
    return (f"{scored['heldout_loss']:.4f} [{scored['heldout_loss_ci_low']:.4f}, "
            f"{scored['heldout_loss_ci_high']:.4f}]")


def result_row(state: dict, setup: str = "federated") -> dict:
    """One table row: a pair's federated run, or one of its setups (base, local,
    centralized)."""
    part = state if setup == "federated" else state["setups"][setup]
    row = {"Model": state["model"], "Task": state["task"], "Setup": setup,
           "Status": state["status"]}
    evaluation = {}
    if part.get("eval_file") and Path(part["eval_file"]).is_file():
        evaluation = json.loads(Path(part["eval_file"]).read_text())["protocols"]
    for protocol, prefix in (("flowertune", ""), ("logprob", "logprob ")):
        summary = evaluation.get(protocol)
        for key, title in CATEGORY_COLUMNS:
            cat = summary["categories"].get(key) if summary else None
            row[f"{prefix}{title}"] = round(100 * cat["accuracy"], 2) if cat else None
        average = summary.get("average") if summary else None
        row[f"{prefix}Average"] = round(100 * average, 2) if average is not None else None
    row["Held-out loss [95% CI or range]"] = heldout_cell(part.get("metrics_file"),
                                                 part.get("heldout_from"))
    row["Comm. Costs (MB)"] = (round(part["comm_mb"], 2) if part.get("comm_mb") is not None
                               and setup != "base" else None)
    row["Rounds"] = state.get("rounds") if setup != "base" else 0
    seconds = (part.get("train_seconds") or 0) + (part.get("eval_seconds") or 0)
    row["Wall time (s)"] = round(seconds, 1) if seconds else None
    row["MMLU questions/subject"] = part.get("limit_per_subject") or "all"
    row["Error"] = state.get("error")
    return row


SETUP_ORDER = ("base", "local", "federated", "centralized")


def result_rows(state: dict) -> list[dict]:
    setups = {"federated", *state.get("setups", {})}
    return [result_row(state, setup) for setup in SETUP_ORDER if setup in setups]


def markdown(rows: list[dict]) -> str:
    columns = [c for c in rows[0] if c != "Error"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row[c] is None else str(row[c])
                                       for c in columns) + " |")
    errors = [f"- {r['Model']}: {r['Error']}" for r in rows if r.get("Error")]
    notes = ["", "Accuracy in %: the first four columns use the FlowerTune leaderboard protocol, "
             "the logprob columns lm-evaluation-harness's log-likelihood protocol."]
    return "\n".join(lines + notes + (["", "Failures:", *errors] if errors else [])) + "\n"


def heldout_curve(metrics_file: Path) -> tuple[list[int], list[float], list[float], list[float]]:
    """Rounds, held-out loss and its band (95 % CI, or the range over local holders) of one
    run, from round 0 (the base model, in run.json) on; empty without held-out scoring."""
    run_file = metrics_file.with_name("run.json")
    base = json.loads(run_file.read_text()).get("heldout_base") if run_file.is_file() else None
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    scored = ([{"round": 0, **base}] if base else []) + [r for r in rows if "heldout_loss" in r]
    low = [r.get("heldout_loss_min", r.get("heldout_loss_ci_low", r["heldout_loss"]))
           for r in scored]
    high = [r.get("heldout_loss_max", r.get("heldout_loss_ci_high", r["heldout_loss"]))
            for r in scored]
    return [r["round"] for r in scored], [r["heldout_loss"] for r in scored], low, high


def plot(states: list[dict], target: Path) -> None:
    """Train loss, held-out loss of every setup (base at round 0), communication and MMLU by
    category for every model and setup, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((loss_ax, heldout_ax), (comm_ax, acc_ax)) = plt.subplots(2, 2, figsize=(16, 9))
    scored = []  # (label, evaluation file) of every model and setup with an MMLU result
    for state in states:
        name = model_slug(state["model"])
        metrics_file = Path(state.get("metrics_file") or "/nonexistent")
        if metrics_file.is_file():
            rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
            rounds = [r["round"] for r in rows]
            loss_ax.plot(rounds, [r["train_loss"] for r in rows], marker="o", label=name)
            comm_ax.plot(rounds, [r["comm_mb_total"] for r in rows], marker="o", label=name)
        setups = {"federated": state, **state.get("setups", {})}
        for setup in SETUP_ORDER:
            part = setups.get(setup)
            if part is None:
                continue
            if part.get("eval_file") and Path(part["eval_file"]).is_file():
                scored.append((f"{name} {setup}", part["eval_file"]))
            setup_metrics = Path(part.get("metrics_file") or "/nonexistent")
            if setup != "base" and setup_metrics.is_file():
                rounds, losses, low, high = heldout_curve(setup_metrics)
                if rounds:
                    line = heldout_ax.plot(rounds, losses, marker="o", label=f"{name} {setup}")
                    heldout_ax.fill_between(rounds, low, high, alpha=0.08,
                                            color=line[0].get_color())
    loss_ax.set(title="Train loss per round (federated)", xlabel="round", ylabel="loss")
    heldout_ax.set(title="Held-out loss (round 0 = base; band: 95 % CI, local: range)",
                   xlabel="round", ylabel="mean token loss")
    comm_ax.set(title="Cumulative communication", xlabel="round", ylabel="MB (2^20 bytes)")
    width = 0.8 / max(1, len(scored))
    for i, (label, eval_file) in enumerate(scored):
        summary = json.loads(Path(eval_file).read_text())["protocols"]
        for j, protocol in enumerate(p for p in ("flowertune", "logprob") if p in summary):
            values = [100 * summary[protocol]["categories"][key]["accuracy"]
                      if key in summary[protocol]["categories"] else 0
                      for key, _ in CATEGORY_COLUMNS]
            xs = [k + i * width + j * width / 2 for k in range(len(CATEGORY_COLUMNS))]
            acc_ax.bar(xs, values, width / 2, label=f"{label} ({protocol})",
                       hatch="//" if protocol == "logprob" else None)
    acc_ax.axhline(25, color="grey", linestyle="--", linewidth=1, label="chance")
    acc_ax.set_xticks(range(len(CATEGORY_COLUMNS)), [t for _, t in CATEGORY_COLUMNS])
    acc_ax.set(title="MMLU accuracy by category", ylabel="%")
    for ax in (loss_ax, heldout_ax, comm_ax, acc_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_figure(target, fig)
    plt.close(fig)


def write_results(sweep_dir: Path, states: list[dict]) -> list[dict]:
    rows = [row for state in states for row in result_rows(state)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "results.csv", buffer.getvalue())
    atomic_write_json(sweep_dir / "results.json", rows)
    atomic_write_text(sweep_dir / "results.md", markdown(rows))
    plot(states, sweep_dir / "results.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. from a job scheduler) unwinds like Ctrl-C, so run_logged stops its command.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        task = validate(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
    sweep_dir = Path(args.output_root).expanduser().resolve() / args.task / run_id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    global _sweep_log
    _sweep_log = sweep_dir / "sweep.log"
    say(f"sweep folder: {sweep_dir}")
    env = environment(args)
    requested = [run_pair(model, args, task, sweep_dir, env) for model in args.model]
    # Pairs of earlier invocations of this run id stay in the table.
    states = list(requested)
    for state_file in sorted(sweep_dir.glob("*/pair.json")):
        state = json.loads(state_file.read_text())
        if state["model"] not in args.model:
            states.append(state)
    rows = write_results(sweep_dir, states)
    say(markdown(rows))
    say(f"results: {sweep_dir / 'results.md'}")
    return 0 if all(s["status"] == "completed" for s in requested) else 1


if __name__ == "__main__":
    sys.exit(main())
