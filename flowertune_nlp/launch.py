"""Run the app through `flwr run` on a local simulation SuperLink that this process owns.

`flwr run .` with a `:local:` SuperLink starts a detached `flower-superlink` that outlives the
command (and keeps the environment of whoever started it). This launcher starts that SuperLink
itself, in its own process group, runs `flwr run <app> local --stream`, and then stops the whole
group, so nothing is left running. It also keeps Flower's state in a repo-local FLWR_HOME
(federation settings never go into pyproject.toml, which Flower 1.42 would rewrite).

    python -m flowertune_nlp.launch --run-config configs/cpu-smoke.toml
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from flowertune_nlp import hardware
from flowertune_nlp.cli import ArgumentParser
from flowertune_nlp.config import ConfigError, build_config, markdown_table
from flowertune_nlp.flower_home import (
    FEDERATION,
    federation_config,
    flower_environment,
    write_flower_home,
)
from flowertune_nlp.outputs import current_status, default_run_name
from flowertune_nlp.processes import (
    start_superlink,
    stop_local_superlink,
    stop_process_tree,
    wait_for_flwr_run,
)
from flowertune_nlp.progress import ProgressWatcher
from flowertune_nlp.run_config import merge_run_configs
from flowertune_nlp.run_state import StateError, open_resumable

APP_DIR = Path(__file__).resolve().parents[1]



class _PlainStream:
    """stderr as a non-terminal, so progress prints a line per round between Flower's logs."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@dataclass
class RunOutcome:
    exit_code: int  # 0 completed, 1 the run failed, 2 the config was rejected
    run_dir: Path | None
    status: str
    error: str | None = None


def run_app(run_configs: list[str | Mapping[str, Any]], app_dir: Path = APP_DIR,
            num_supernodes: int = 20, cpus_per_client: int = 2,
            gpus_per_client: float | None = None,
            jemalloc: bool = True, ray_address: str | None = None) -> RunOutcome:
    """Validate the config, run it to completion through `flwr run`, stop every process it
    started, and report the run's status from its run.json (`flwr run` exits 0 even when the
    ServerApp fails). With `ray_address`, the simulation's clients run on that Ray cluster
    (flower_home.flower_environment), which is left running."""
    try:
        overrides = merge_run_configs(run_configs)
        config = build_config(overrides)
        gpus = hardware.gpus_per_client(gpus_per_client)  # None: a GPU each where there is one
    except (ConfigError, ValueError) as err:
        return RunOutcome(2, None, "rejected", str(err))
    if config.run.resume:
        try:
            run_dir, state, _ = open_resumable(config)
        except StateError as err:
            return RunOutcome(2, Path(config.run.resume), "rejected", str(err))
        print(f"resuming {run_dir} after round {state.server_round}", file=sys.stderr)
    else:
        if not config.run_name:
            overrides["run-name"] = default_run_name(config)
        run_dir = (Path(config.output_dir).expanduser() / overrides["run-name"]).resolve()
        if (run_dir / "run.json").exists():
            return RunOutcome(2, run_dir, "rejected", f"run folder {run_dir} already holds a "
                              "run; choose another run-name, or resume it with "
                              f'run.resume="{run_dir}"')

    flwr_home = Path(os.environ.get("FLOWERTUNE_FLWR_HOME", app_dir / ".flwr"))
    write_flower_home(flwr_home)
    merged = flwr_home / f"run-config-{os.getpid()}.toml"
    merged.write_text(tomli_w.dumps(overrides))
    env = flower_environment(flwr_home, jemalloc, ray_address)
    superlink = start_superlink(env, flwr_home, flwr_home / "local-superlink" / "superlink.log")
    sessions: set[int] = set()
    try:
        command = [str(Path(sys.executable).with_name("flwr")), "run", str(app_dir), FEDERATION,
                   "--stream", "--run-config", str(merged), "--federation-config",
                   federation_config(num_supernodes, cpus_per_client, gpus)]
        # Flower's own log lines stream to this terminal too: progress prints plain lines.
        with ProgressWatcher(run_dir, config.num_server_rounds, stream=_PlainStream(),
                             prefix="progress: "):
            wait_for_flwr_run(command, env, superlink, sessions)
    finally:
        stop_process_tree(superlink, sessions)
        merged.unlink(missing_ok=True)
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return RunOutcome(1, run_dir, "failed", f"the run left no readable {run_dir}/run.json")
    status = current_status(record)
    if status == "interrupted":  # the ServerApp died without recording an outcome
        return RunOutcome(1, run_dir, "interrupted", "the ServerApp stopped before the run "
                          "finished (killed or out of memory?); continue it with "
                          f'run.resume="{run_dir}"')
    return RunOutcome(0 if status == "completed" else 1, run_dir, status, record.get("error"))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", "-c", action="append", default=[],
                        help="a TOML file or 'key=value' overrides, as for `flwr run`; repeatable")
    parser.add_argument("--num-supernodes", type=int, default=20,
                        help="simulated nodes: workers that train the round's partitions; any "
                             "number gives the same result")
    # Flower wants a whole number here ("'float' object cannot be interpreted as an integer").
    parser.add_argument("--cpus-per-client", type=int, default=2,
                        help="Ray CPUs per client; total CPUs / this = clients training at once")
    parser.add_argument("--gpus-per-client", type=float, default=None,
                        help="Ray GPUs per client, 0 to 1 (default: 1 where this machine has an "
                        "NVIDIA GPU, else 0; 0.5: two clients share a GPU)")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="run the simulation's clients on this running Ray cluster (the "
                        "head's `ray start --head --port`), which stays up; default: a Ray of "
                        "its own on this machine, unless RAY_ADDRESS is set")
    parser.add_argument("--no-jemalloc", action="store_true",
                        help="do not preload jemalloc even where it is installed")
    parser.add_argument("--list-keys", action="store_true",
                        help="print every run-config key with its default and meaning, then exit")
    parser.add_argument("--stop-local-superlink", action="store_true",
                        help="stop the SuperLink (and its SuperExec, Ray) that a plain `flwr run` "
                             "left running, then exit")
    args = parser.parse_args(argv)
    if args.list_keys:
        print(markdown_table())
        return 0
    if args.stop_local_superlink:
        stopped = stop_local_superlink()
        print(f"stopped local SuperLink {stopped}" if stopped else "no local SuperLink running")
        return 0
    # SIGTERM (e.g. from a job scheduler) unwinds like Ctrl-C, so the cleanup below still runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    outcome = run_app(args.run_config, num_supernodes=args.num_supernodes,
                      cpus_per_client=args.cpus_per_client, gpus_per_client=args.gpus_per_client,
                      jemalloc=not args.no_jemalloc, ray_address=args.ray_address)
    if outcome.error:
        print(f"error: {outcome.error}", file=sys.stderr)
    if outcome.run_dir:
        print(f"run {outcome.status}: {outcome.run_dir}", file=sys.stderr)
    print(json.dumps({"status": outcome.status,
                      "run_dir": str(outcome.run_dir) if outcome.run_dir else None}))
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
