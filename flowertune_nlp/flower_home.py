"""The Flower home and environment of a run: the one place that sets the FLWR_* and
TOKENIZERS_PARALLELISM variables Flower's processes (and the ClientApps they start) inherit.

Federation settings go into a repo-local FLWR_HOME, never into pyproject.toml (which Flower 1.42
would rewrite); every port is a free one, so two runs on one machine never collide.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

FEDERATION = "local"
# Quiet, offline-safe settings for every process of a run, and for the sweep's launchers and
# evaluations too (run_experiments.environment).
QUIET_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                  "/usr/local/lib/libjemalloc.so.2")


def find_jemalloc() -> str | None:
    """jemalloc, where the system has it (Debian/Ubuntu: apt install libjemalloc2)."""
    return next((path for path in JEMALLOC_PATHS if Path(path).is_file()), None)


def flower_environment(flwr_home: Path, jemalloc: bool = True,
                       ray_address: str | None = None) -> dict[str, str]:
    """The environment every Flower process of a run needs (inherited by ClientApps).

    With `jemalloc`, and where it is installed, it is preloaded into every Flower process: it
    cut a run's peak memory by 0.3-0.4 GB RSS / 0.2-0.5 GB PSS here (steps were not faster;
    bench/step_efficiency.py and bench/peak_rss.py measure both).

    `ray_address` (`host:port` of a running Ray cluster's head) makes the simulation join that
    cluster: Flower 1.42's Ray backend calls `ray.init()` without an address
    (flwr/server/superlink/fleet/vce/backend/raybackend.py, `init_ray`), and Ray then takes
    RAY_ADDRESS. Without one, a RAY_ADDRESS already set is kept, and otherwise it is "local": a
    simulation starts its own Ray instead of silently joining a `ray start` cluster that Ray
    would find on this machine (/tmp/ray/ray_current_cluster).
    """
    env = dict(os.environ)
    library = find_jemalloc() if jemalloc else None
    if jemalloc and library is None:  # said, not silent: the run's peak memory depends on it
        print("note: jemalloc is not installed (Debian/Ubuntu: apt install libjemalloc2); "
              "Flower's processes use the system allocator, about 0.3 GB more peak memory",
              file=sys.stderr)
    if library and library not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = " ".join(filter(None, [library, env.get("LD_PRELOAD")]))
    env.update(
        QUIET_ENVIRONMENT,
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # else `uv sync` pulls CUDA torch
        RAY_DEDUP_LOGS="0",
        RAY_ADDRESS=ray_address or os.environ.get("RAY_ADDRESS") or "local",
        # How often a SuperExec asks for a new task (Flower's default 1 s): a message waits
        # half of it on average before its process starts (flwr/supercore/superexec/
        # run_superexec.py); 0.2 s costs a few loopback requests a second.
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2",
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
