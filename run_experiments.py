"""Sweep models x tasks: train each model on each task through `flwr run`, evaluate the base
model and the final adapter on the task's evaluation suite (both protocols), and write one
results table (CSV, JSON, Markdown) plus a picture per task. With
`--baseline centralized,local` each model is also trained without a federation on the pooled
data and by single data holders alone (flowertune_nlp.baselines), and the base model, local,
federated and centralized training appear side by side, with their held-out losses.

Everything is read from files the runs write (run.json, metrics.jsonl, the evaluation JSON),
never scraped from output. A failed model is recorded and the sweep goes on; re-running the same
--run-id skips pairs that already completed (unless --force).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from flowertune_nlp.baselines import KINDS as BASELINE_KINDS
from flowertune_nlp.baselines import local_partitions
from flowertune_nlp.cli import ArgumentParser
from flowertune_nlp.config import build_config
from flowertune_nlp.flower_home import QUIET_ENVIRONMENT
from flowertune_nlp.io import atomic_write_json, atomic_write_text
from flowertune_nlp.names import model_slug
from flowertune_nlp.outputs import current_status, read_status
from flowertune_nlp.processes import stop_process_tree
from flowertune_nlp.progress import ProgressWatcher
from flowertune_nlp.run_config import merge_run_configs
from flowertune_nlp.sweep_report import markdown, write_results
from flowertune_nlp.tasks import TASKS, Task, UnknownTask, parse_task_list, stand_in_path

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"
CHILD_STOP_SECONDS = 60.0  # a stopped launcher's own clean-up takes a few seconds
# The evaluation's protocol names; MMLU's own names are accepted too.
PROTOCOL_ALIASES = {"flowertune": "leaderboard", "logprob": "robust"}


_sweep_log: Path | None = None


def say(message: str) -> None:
    """Print and append to the sweep's own log in its run folder."""
    print(message, flush=True)
    if _sweep_log is not None:
        with _sweep_log.open("a") as log:
            log.write(message + "\n")


class UsageError(Exception):
    """A bad argument: reported with exit code 2 before anything runs."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="base model: hub id, local folder, GGUF file or package:<pkg>/<file>;"
                        " repeat the flag or separate with commas")
    parser.add_argument("--task", default="general_nlp",
                        help=f"comma-separated tasks, or all: {', '.join(TASKS)} "
                        "(general-nlp is accepted)")
    parser.add_argument("--preset", default=None,
                        help="a configs/<name>.toml run-config preset, e.g. cpu-smoke")
    parser.add_argument("--run-config", action="append", default=[],
                        help="extra 'key=value' run-config overrides passed to flwr run")
    parser.add_argument("--data-dir", default=None,
                        help="offline data laid out like ../shared/data (alpaca-gpt4/, mmlu/, "
                        "finance/, medical/, code/): training uses each task's stand-in, "
                        "evaluation the local sets; also turns the hub off")
    parser.add_argument("--eval-only", action="store_true",
                        help="skip training; evaluate the adapter an earlier training of this "
                        "run id recorded (or --peft-path)")
    parser.add_argument("--peft-path", default=None, help="adapter to evaluate with --eval-only")
    parser.add_argument("--protocol", default="leaderboard,robust",
                        help="evaluation protocols: leaderboard, robust or both (MMLU's "
                        "flowertune/logprob are accepted)")
    parser.add_argument("--eval-limit", "--limit-per-subject", dest="eval_limit", type=int,
                        default=None,
                        help="items scored per set (MMLU: per subject); default: the task's "
                        "value for the preset (flowertune_nlp/tasks.py), else all")
    parser.add_argument("--skip-base", action="store_true",
                        help="do not score the base model (the `base` row)")
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
                        help="where <run-id>/ sweep folders go")
    args = parser.parse_args(argv)
    args.model = [m.strip() for spec in args.model for m in spec.split(",") if m.strip()]
    return args


def validate(args: argparse.Namespace) -> list[Task]:
    """Check every argument before anything runs; returns the tasks."""
    try:
        tasks = [TASKS[name] for name in parse_task_list(args.task)]
    except UnknownTask as err:
        raise UsageError(str(err)) from None
    protocols = [PROTOCOL_ALIASES.get(p.strip(), p.strip()) for p in args.protocol.split(",")
                 if p.strip()]
    bad = [p for p in protocols if p not in ("leaderboard", "robust")]
    if bad or not protocols:
        raise UsageError(f"--protocol {args.protocol!r}: choose leaderboard, robust or both")
    args.protocol = ",".join(dict.fromkeys(protocols))
    if not args.model:
        raise UsageError("--model is empty")
    if args.preset is not None and not (CONFIGS / f"{args.preset}.toml").is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.toml"))
        raise UsageError(f"unknown preset {args.preset!r}; known presets: {', '.join(known)}")
    if args.data_dir is not None:
        data = Path(args.data_dir).expanduser()
        for task in tasks:
            for sub in (EVAL_FOLDERS[task.name], *_stand_in_folders(task)):
                if not (data / sub).exists():
                    raise UsageError(f"--data-dir {data} has no {sub} (task {task.name}); lay "
                                     "it out like ../shared/data")
    if args.eval_only and args.peft_path and not Path(args.peft_path).is_dir():
        raise UsageError(f"--peft-path {args.peft_path} is not a folder")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise UsageError(f"--eval-limit {args.eval_limit} is not >= 1; omit it to score every "
                         "item")
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
    return tasks


# What evaluation reads under --data-dir, per task.
EVAL_FOLDERS = {"general_nlp": "mmlu/test", "finance": "finance", "medical": "medical",
                "code": "code"}


def _stand_in_folders(task: Task) -> list[str]:
    """The offline training file of a task, or (finance, built) the folder it is built from."""
    return [task.stand_in.path] if task.stand_in.path else ["finance"]


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


def run_watched(command: list[str], log_file: Path, env: dict[str, str], run_dir: Path,
                run_config: list[str], label: str) -> int:
    """`run_logged` of a training command, showing its progress (round k/N, losses,
    communication, time left) from the run folder while it runs."""
    try:
        rounds = build_config(merge_run_configs(run_config)).num_server_rounds
    except ValueError:  # the command itself reports the bad config
        return run_logged(command, log_file, env)
    with ProgressWatcher(run_dir, rounds, stream=sys.stdout, prefix=f"{label} "):
        return run_logged(command, log_file, env)


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


def training_data(args, task: Task, sweep_dir: Path) -> tuple[str | None, str]:
    """The `static.dataset.name` a pair trains on (None: the task's own hub id, or what the
    user's run config names) and the sentence the results table carries about it."""
    user = merge_run_configs(run_configs(args)).get("static.dataset.name")
    if user:
        return None, str(user)
    if args.data_dir:
        path = stand_in_path(task, Path(args.data_dir).expanduser().resolve(),
                             sweep_dir / "stand-ins")
        return str(path), f"{path.name}, {_row_count(path):,} rows ({task.stand_in.note})"
    return None, task.dataset


def _row_count(path: Path) -> int:
    """Rows of a JSON (list) or JSON Lines training file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return len(json.loads(text))
    return sum(1 for line in text.splitlines() if line.strip())


def _recorded_seconds(record: dict) -> float:
    """A run's wall time from its run.json, start of the first attempt to the end of the last
    (what a resumed training took, pauses included)."""
    from datetime import datetime

    try:
        start, end = (datetime.strptime(record[k], "%Y-%m-%dT%H:%M:%S%z")
                      for k in ("started_at", "finished_at"))
    except (KeyError, TypeError, ValueError):  # a record without both times: unknown
        return 0.0
    return (end - start).total_seconds()


def train(model: str, args, task: Task, dataset: str | None, pair_dir: Path, env,
          resume: bool, earlier_seconds: float = 0.0) -> dict:
    """Train through the launcher; with `resume`, continue the pair's saved run instead (adding
    the `earlier_seconds` its earlier attempts trained), or reuse it where it completed."""
    run_dir = pair_dir / "train"
    record_file = run_dir / "run.json"
    log_file = pair_dir / "train.log"
    reused = resume and read_status(record_file) == "completed"
    if not reused:
        # The pair's own settings go in a TOML file: no quoting of paths or model names.
        overrides = {"model.name": model, "task": task.name, "output-dir": str(pair_dir),
                     "run-name": run_dir.name}
        if dataset is not None:
            overrides["static.dataset.name"] = dataset
        if resume:
            overrides["run.resume"] = str(run_dir)
        overrides_file = pair_dir / "run-config.toml"
        atomic_write_text(overrides_file, tomli_w.dumps(overrides))
        command = [sys.executable, "-m", "flowertune_nlp.launch"]
        for item in [*run_configs(args), str(overrides_file)]:
            command += ["--run-config", item]
        start = time.perf_counter()
        code = run_watched(command, log_file, env, run_dir,
                           [*run_configs(args), str(overrides_file)],
                           f"[{model_slug(model)} {task.name}]")
        seconds = time.perf_counter() - start + earlier_seconds
        if not record_file.is_file():
            errors = [line for line in log_file.read_text().splitlines()
                      if line.startswith("error:")]
            reason = errors[-1] if errors else "training wrote no run.json"
            raise RuntimeError(f"{reason} (exit {code}); see {log_file}")
    else:
        code = 0
        say(f"[{model_slug(model)} {task.name}] training already completed; evaluating its adapter")
    record = json.loads(record_file.read_text())
    if reused:  # an earlier attempt trained it all: run.json's wall span
        seconds = _recorded_seconds(record)
    status = current_status(record)
    if code != 0 or status != "completed" or not record.get("final_adapter"):
        hint = (f"; continue with --resume --run-id {pair_dir.parent.parent.name}"
                if (run_dir / "state").is_dir() else "")
        raise RuntimeError(f"training {status}: {record.get('error')}; "
                           f"see {log_file}{hint}")
    return {"train_seconds": seconds, "adapter": record["final_adapter"],
            "rounds": record.get("rounds"), "comm_mb": record.get("comm_mb_total"),
            "metrics_file": str(run_dir / "metrics.jsonl")}


def train_baseline(model: str, kind: str, args, pair_dir: Path, env) -> dict:
    """Train a baseline (flowertune_nlp.baselines) with the federated run's config; a completed
    one (an earlier attempt of a resumed sweep) is reused, an incomplete one moved aside."""
    run_dir = pair_dir / kind
    record_file = run_dir / "run.json"
    if read_status(record_file) == "completed":
        say(f"[{model_slug(model)}] {kind} baseline already completed in {pair_dir}")
        record = json.loads(record_file.read_text())
        return {"train_seconds": _recorded_seconds(record), "adapter": record["final_adapter"],
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
    code = run_watched(command, log_file, env, run_dir, [*run_configs(args), str(overrides_file)],
                       f"[{model_slug(model)} {kind}]")
    if code != 0 or read_status(record_file) != "completed":
        raise RuntimeError(f"{kind} baseline failed (exit {code}); see {log_file}")
    record = json.loads(record_file.read_text())
    return {"train_seconds": time.perf_counter() - start, "adapter": record["final_adapter"],
            "metrics_file": str(run_dir / "metrics.jsonl"), "comm_mb": 0.0}


def evaluate(model: str, adapter: str | None, args, task: Task, pair_dir: Path, env,
             setup: str = "federated") -> dict:
    """The task's suite on the model with `adapter` (None: the base model alone)."""
    limit = args.eval_limit
    if limit is None and args.preset:
        limit = task.eval_limits.get(args.preset)
    suffix = "" if setup == "federated" else f"-{setup}"
    output = pair_dir / f"eval{suffix}.json"
    command = [sys.executable, "-m", "evaluation", "--task", task.name,
               "--base-model-name-path", model, "--protocol", args.protocol, "--batch-size",
               str(args.eval_batch_size), "--run-name", model_slug(model), "--output", str(output),
               "--no-progress"]
    if args.data_dir:
        command += ["--data-dir", str(Path(args.data_dir).expanduser().resolve())]
    if adapter:
        command += ["--peft-path", adapter]
    if limit:
        command += ["--limit", str(limit)]
    log_file = pair_dir / f"eval{suffix}.log"
    start = time.perf_counter()
    code = run_logged(command, log_file, env)
    if code != 0 or not output.is_file():
        raise RuntimeError(f"evaluation failed (exit {code}); see {log_file}")
    return {"eval_seconds": time.perf_counter() - start, "eval_file": str(output),
            "eval_limit": limit}


def run_pair(model: str, args, task: Task, sweep_dir: Path, env) -> dict:
    """Train `model` on `task` and evaluate the base model and the adapter (and the baselines
    asked for); a failure is recorded in pair.json and the sweep goes on."""
    pair_dir = sweep_dir / task.name / model_slug(model)
    tag = f"[{model_slug(model)} {task.name}]"
    state_file = pair_dir / "pair.json"
    previous = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if previous.get("status") == "completed" and not args.force:
        say(f"{tag} already completed in this run id; skipping (use --force to redo)")
        return previous
    resume = args.resume and (pair_dir / "train" / "run.json").is_file()
    if pair_dir.exists() and not args.eval_only and not resume:
        # Keep what an earlier attempt wrote; a new training needs a fresh folder.
        pair_dir.rename(pair_dir.with_name(f"{pair_dir.name}.attempt-{time.strftime('%H%M%S')}"))
    pair_dir.mkdir(parents=True, exist_ok=True)
    state = {"model": model, "task": task.name, "status": "running", "pair_dir": str(pair_dir)}
    try:
        dataset, state["training_data"] = training_data(args, task, sweep_dir)
        if args.eval_only:
            adapter = args.peft_path or previous.get("adapter")
            if not adapter:
                raise RuntimeError("--eval-only found no adapter for this model and task in "
                                   "this run id; train first or pass --peft-path")
            state.update({k: v for k, v in previous.items() if k not in state})
            state["adapter"] = adapter
        else:
            say(f"{tag} {'resuming ' if resume else ''}training "
                f"(log: {pair_dir / 'train.log'})")
            state.update(train(model, args, task, dataset, pair_dir, env, resume,
                               previous.get("train_seconds", 0.0) if resume else 0.0))
        say(f"{tag} evaluating {state['adapter']} (log: {pair_dir / 'eval.log'})")
        state.update(evaluate(model, state["adapter"], args, task, pair_dir, env))
        if not args.eval_only:  # --eval-only keeps the earlier setups
            state["setups"] = {}
            if not args.skip_base:
                say(f"{tag} evaluating the base model (log: {pair_dir / 'eval-base.log'})")
                state["setups"]["base"] = {
                    "heldout_from": str(pair_dir / "train" / "run.json"),
                    **evaluate(model, None, args, task, pair_dir, env, "base")}
            for kind in baselines(args):
                say(f"{tag} {kind} baseline (log: {pair_dir / f'{kind}.log'})")
                setup = train_baseline(model, kind, args, pair_dir, env)
                setup.update(evaluate(model, setup["adapter"], args, task, pair_dir, env, kind))
                state["setups"][kind] = setup
        state["status"] = "completed"
    except Exception as err:  # one broken pair (a corrupt run.json, a crash) is recorded
        # as failed, and the sweep goes on with the other pairs
        reason = str(err) if isinstance(err, RuntimeError) else f"{type(err).__name__}: {err}"
        state.update(status="failed", error=reason)
        say(f"{tag} FAILED: {reason}")
    atomic_write_json(state_file, state)
    return state


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. from a job scheduler) unwinds like Ctrl-C, so run_logged stops its command.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        tasks = validate(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
    sweep_dir = Path(args.output_root).expanduser().resolve() / run_id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    global _sweep_log
    _sweep_log = sweep_dir / "sweep.log"
    say(f"sweep folder: {sweep_dir}")
    env = environment(args)
    # Model by model, its tasks one after the other: the converted base model and the OS file
    # cache stay warm between the pairs that load it.
    requested = [run_pair(model, args, task, sweep_dir, env)
                 for model in args.model for task in tasks]
    # Pairs of earlier invocations of this run id stay in the table.
    done = {(s["model"], s["task"]) for s in requested}
    states = list(requested)
    for state_file in sorted(sweep_dir.glob("*/*/pair.json")):
        state = json.loads(state_file.read_text())
        if (state["model"], state["task"]) not in done:
            states.append(state)
    rows = write_results(sweep_dir, states)
    say(markdown(rows))
    say(f"results: {sweep_dir / 'results.md'} (pictures: results-<task>.png)")
    return 0 if all(s["status"] == "completed" for s in requested) else 1


if __name__ == "__main__":
    sys.exit(main())
