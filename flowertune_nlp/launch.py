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
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import tomli_w

from flowertune_nlp import hardware
from flowertune_nlp.config import ConfigError, build_config
from flowertune_nlp.outputs import current_status, default_run_name
from flowertune_nlp.run_state import StateError, open_resumable

APP_DIR = Path(__file__).resolve().parents[1]
FEDERATION = "local"
# The simulation runtime runs the ServerApp (and Ray); a deployment runs `flwr-serverapp`.
SERVER_APP_PROCESSES = ("flwr-simulation", "flwr-serverapp")


JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                  "/usr/local/lib/libjemalloc.so.2")


def find_jemalloc() -> str | None:
    """jemalloc, where the system has it (Debian/Ubuntu: apt install libjemalloc2)."""
    return next((path for path in JEMALLOC_PATHS if Path(path).is_file()), None)


def flower_environment(flwr_home: Path, jemalloc: bool = True) -> dict[str, str]:
    """The environment every Flower process of a run needs (inherited by ClientApps).

    With `jemalloc`, and where it is installed, it is preloaded into every Flower process: it
    cut a run's peak memory by 0.3 GB RSS / 0.5 GB PSS here (steps were not faster;
    bench/step_efficiency.py and bench/peak_rss.py measure both).
    """
    env = dict(os.environ)
    library = find_jemalloc() if jemalloc else None
    if library and library not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = " ".join(filter(None, [library, env.get("LD_PRELOAD")]))
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # else `uv sync` pulls CUDA torch
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_DEDUP_LOGS="0",
        TOKENIZERS_PARALLELISM="false",
    )
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    # Flower spawns `flower-superexec` and `flwr-simulation` by name: they must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_flower_home(flwr_home: Path) -> Path:
    """A Flower configuration whose default connection is a local simulation SuperLink (the
    federation's size and resources go to `flwr run --federation-config`)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{FEDERATION}"\n\n'
                    f'[superlink.{FEDERATION}]\naddress = ":local:"\n')
    return path


def federation_config(num_supernodes: int, cpus_per_client: int, gpus_per_client: float
                      ) -> str:
    """`flwr run --federation-config` for `num_supernodes` simulated nodes."""
    return (f"num-supernodes={num_supernodes} "
            f"client-resources-num-cpus={cpus_per_client} "
            f"client-resources-num-gpus={gpus_per_client}")


def free_port() -> int:
    """A TCP port nothing listens on now, so two runs on one machine never collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _superlink_healthy(port: str) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.4).is_success
    except httpx.HTTPError:
        return False


def start_superlink(env: dict[str, str], flwr_home: Path, log_file: Path) -> subprocess.Popen:
    """Start the simulation SuperLink that `flwr run` would start, but owned by us, on the free
    ports in `env` (the `flwr` CLI reads the same variables to find it)."""
    port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    control = env["FLWR_LOCAL_CONTROL_API_PORT"]
    runtime = flwr_home / "local-superlink"
    runtime.mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(sys.executable).with_name("flower-superlink")), "--insecure", "--simulation",
        "--isolation", "subprocess", "--control-api-address", f"127.0.0.1:{control}",
        "--host", "127.0.0.1", "--port", port, "--database", ":flwr-in-memory:",
        "--log-file", str(log_file),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}; "
                               f"see {log_file}")
        if _superlink_healthy(port):
            return process
        time.sleep(0.2)
    stop_process_tree(process)
    raise RuntimeError(f"flower-superlink did not start within 60 s; see {log_file}")


def launched_processes(root: subprocess.Popen | int, sessions: set[int]
                       ) -> list[psutil.Process]:
    """The root, its descendants, and every process in one of `sessions`.

    Flower starts SuperExec detached in its own session, so a process-group kill would miss
    it. Ray processes whose parent was killed are re-parented to init and are no longer
    descendants, but they stay in that session.
    """
    family: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        top = psutil.Process(root if isinstance(root, int) else root.pid)
        family.update({p.pid: p for p in [top, *top.children(recursive=True)]})
    sessions = (sessions | launched_sessions(list(family.values()))) - {os.getsid(0)}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(proc.pid) in sessions:
                family[proc.pid] = proc
    return list(family.values())


def launched_sessions(processes: list[psutil.Process]) -> set[int]:
    sessions = set()
    for proc in processes:
        with contextlib.suppress(ProcessLookupError):
            sessions.add(os.getsid(proc.pid))
    return sessions


def terminate_then_kill(processes: list[psutil.Process], grace: float = 10.0) -> None:
    """SIGTERM every process, then SIGKILL whatever is still there after `grace` seconds."""
    for member in processes:
        with contextlib.suppress(psutil.Error):
            member.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for member in alive:
        with contextlib.suppress(psutil.Error):
            member.kill()
    psutil.wait_procs(alive, timeout=5)


def stop_process_tree(process: subprocess.Popen | int, sessions: Iterable[int] = (),
                      grace: float = 10.0) -> None:
    """Stop a process, all its descendants (SuperExec, simulation runtime, Ray) and every
    process left in the sessions they opened."""
    terminate_then_kill(launched_processes(process, set(sessions)), grace)
    if isinstance(process, subprocess.Popen):
        process.poll()


def stop_local_superlink(port: str | None = None) -> list[int]:
    """Stop the simulation SuperLink a plain `flwr run` leaves running on 127.0.0.1:`port`
    (Flower's default 39091, or FLWR_LOCAL_SUPERLINK_HTTP_API_PORT), with its SuperExec,
    simulation runtime and Ray processes. Flower 1.42 has no command for this. Returns the
    SuperLink PIDs it stopped."""
    port = port or os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")
    stopped = []
    for proc in psutil.process_iter(["cmdline"]):
        words = proc.info["cmdline"] or []
        if any(Path(w).name == "flower-superlink" for w in words[:2]) and any(
                a == "--port" and b == port for a, b in itertools.pairwise(words)):
            stop_process_tree(proc.pid)
            stopped.append(proc.pid)
    return stopped


def server_app_alive(descendants: list[psutil.Process]) -> bool | None:
    """Whether the process running the ServerApp is alive; None if it never appeared."""
    for proc in descendants:
        with contextlib.suppress(psutil.Error):
            if any(name in " ".join(proc.cmdline()) for name in SERVER_APP_PROCESSES):
                return proc.status() != psutil.STATUS_ZOMBIE
    return None


def wait_for_flwr_run(command: list[str], env: dict[str, str], superlink: subprocess.Popen,
                      sessions: set[int], grace: float = 10.0) -> None:
    """Run `flwr run` to its end, noting the sessions Flower's processes open. If the process
    running the ServerApp dies (killed, out of memory), `flwr run --stream` waits for logs
    forever; stop it `grace` seconds later."""
    runner = subprocess.Popen(command, env=env, cwd=os.getcwd())
    seen, gone_since = False, None
    try:
        while runner.poll() is None:
            time.sleep(0.5)
            try:
                descendants = psutil.Process(superlink.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                descendants = []
            sessions |= launched_sessions(descendants)
            alive = server_app_alive(descendants) if descendants else False
            seen = seen or bool(alive)
            if seen and not alive:
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > grace:
                    print("error: the ServerApp process ended but `flwr run` did not; stopping "
                          "it", file=sys.stderr)
                    runner.terminate()
                    runner.wait(timeout=10)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def merge_run_configs(run_configs: list[str | Mapping[str, Any]]) -> dict:
    """Fuse TOML files, 'key=value' overrides and mappings (later wins) into one flat mapping.

    `flwr run` refuses a TOML file alongside key-value pairs; a preset plus a local dataset
    path is exactly what an offline user needs, so the launcher merges them first.
    """
    import click
    from flwr.common.config import parse_config_args

    merged: dict = {}
    for run_config in run_configs:
        if isinstance(run_config, Mapping):  # callers in Python (benchmarks, tests)
            merged.update(run_config)
            continue
        # Flower silently skips text that is not key=value (`seed=` would start a run on the
        # defaults), so every whitespace-separated token, quoted values emptied, must be one.
        tokens = re.sub(r"'[^']*'|\"[^\"]*\"", '""', run_config).split()
        stray = [t for t in tokens if not re.fullmatch(r"[^=\s]+=\S+", t)]
        if not run_config.endswith(".toml") and stray:
            raise ConfigError(f"--run-config {run_config!r}: {stray[0]!r} is not key=value; "
                              'write e.g. seed=7 or model.name="path/to/model"')
        try:
            merged.update(parse_config_args([run_config]))
        except (click.ClickException, ValueError, OSError) as err:
            message = err.format_message() if isinstance(err, click.ClickException) else err
            raise ConfigError(f"--run-config {run_config!r}: {message}") from None
    return merged


@dataclass
class RunOutcome:
    exit_code: int  # 0 completed, 1 the run failed, 2 the config was rejected
    run_dir: Path | None
    status: str
    error: str | None = None


def run_app(run_configs: list[str | Mapping[str, Any]], app_dir: Path = APP_DIR,
            num_supernodes: int = 20, cpus_per_client: int = 2,
            gpus_per_client: float | None = None,
            jemalloc: bool = True) -> RunOutcome:
    """Validate the config, run it to completion through `flwr run`, stop every process it
    started, and report the run's status from its run.json (`flwr run` exits 0 even when the
    ServerApp fails)."""
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
    env = flower_environment(flwr_home, jemalloc)
    superlink = start_superlink(env, flwr_home, flwr_home / "local-superlink" / "superlink.log")
    sessions: set[int] = set()
    try:
        command = [str(Path(sys.executable).with_name("flwr")), "run", str(app_dir), FEDERATION,
                   "--stream", "--run-config", str(merged), "--federation-config",
                   federation_config(num_supernodes, cpus_per_client, gpus)]
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
    parser = argparse.ArgumentParser(description=__doc__,
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
    parser.add_argument("--no-jemalloc", action="store_true",
                        help="do not preload jemalloc even where it is installed")
    parser.add_argument("--stop-local-superlink", action="store_true",
                        help="stop the SuperLink (and its SuperExec, Ray) that a plain `flwr run` "
                             "left running, then exit")
    args = parser.parse_args(argv)
    if args.stop_local_superlink:
        stopped = stop_local_superlink()
        print(f"stopped local SuperLink {stopped}" if stopped else "no local SuperLink running")
        return 0
    # SIGTERM (e.g. from a job scheduler) unwinds like Ctrl-C, so the cleanup below still runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    outcome = run_app(args.run_config, num_supernodes=args.num_supernodes,
                      cpus_per_client=args.cpus_per_client, gpus_per_client=args.gpus_per_client,
                      jemalloc=not args.no_jemalloc)
    if outcome.error:
        print(f"error: {outcome.error}", file=sys.stderr)
    print(json.dumps({"status": outcome.status,
                      "run_dir": str(outcome.run_dir) if outcome.run_dir else None}))
    return outcome.exit_code

if __name__ == "__main__":
    sys.exit(main())
