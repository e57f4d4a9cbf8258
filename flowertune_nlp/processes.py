"""Supervising the processes of a run: start the simulation SuperLink, watch `flwr run` and the
ServerApp, and stop the whole tree (SuperExec, simulation runtime, Ray), orphans included."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import httpx
import psutil

# The simulation runtime runs the ServerApp (and Ray); a deployment runs `flwr-serverapp`.
SERVER_APP_PROCESSES = ("flwr-simulation", "flwr-serverapp")



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
