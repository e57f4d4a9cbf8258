"""A Ray cluster head on this machine, to try the multi-machine simulation recipe on one machine
and to test it: `ray start --head` on free loopback ports, with a temp folder of its own, stopped
by process id.

    with RayHead(num_cpus=2) as head:
        run_app([...], ray_address=head.address)   # the simulation joins it

`ray stop` would stop every Ray of this user on the machine, so the head runs `--block` in a
session of its own, and `stop` ends exactly that session's processes (the head's daemons and the
workers its raylet started). Its own temp folder keeps its address out of
/tmp/ray/ray_current_cluster, where a plain `ray.init()` elsewhere on the machine would find it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowertune_nlp.flower_home import free_port
from flowertune_nlp.processes import launched_processes, stop_process_tree

LOOPBACK = "127.0.0.1"
PORT_FLAGS = ("--port", "--node-manager-port", "--object-manager-port",
              "--ray-client-server-port", "--dashboard-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")


class RayHead:
    """`ray start --head --block` on loopback with `num_cpus` CPUs (and `num_gpus` GPUs)."""

    def __init__(self, num_cpus: int, num_gpus: int = 0, timeout: float = 120.0) -> None:
        self.num_cpus, self.num_gpus, self.timeout = num_cpus, num_gpus, timeout
        self.process: subprocess.Popen | None = None
        self.temp_dir: Path | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> RayHead:
        ports: dict[str, int] = {}
        for flag in PORT_FLAGS:
            port = free_port()
            while port in ports.values():
                port = free_port()
            ports[flag] = port
        self.port = ports["--port"]
        # short: Ray puts Unix sockets in it (at most 107 bytes a path)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                   "--node-ip-address", LOOPBACK, "--num-cpus", str(self.num_cpus),
                   "--num-gpus", str(self.num_gpus), "--include-dashboard", "false",
                   "--disable-usage-stats", "--temp-dir", str(self.temp_dir)]
        for flag, port in ports.items():
            command += [flag, str(port)]
        log = self.temp_dir / "ray-start.log"
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env={**os.environ, "RAY_ADDRESS": ""})
        deadline = time.monotonic() + self.timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"ray start --head did not come up: {text}")
            time.sleep(0.5)
        return self

    def ready(self) -> bool:
        """Whether the head answers (`ray status` against its address)."""
        result = subprocess.run([str(Path(sys.executable).with_name("ray")), "status",
                                 "--address", self.address], capture_output=True, text=True,
                                timeout=60)
        return result.returncode == 0 and "Resources" in result.stdout

    def processes(self) -> list:
        """The head's processes still running (its session and descendants)."""
        if self.process is None:
            return []
        return launched_processes(self.process, {self.process.pid})

    def stop(self) -> None:
        """End every process of this head (SIGTERM, then SIGKILL) and remove its temp folder."""
        if self.process is not None:
            stop_process_tree(self.process, {self.process.pid}, grace=15.0)
            self.process.wait(timeout=10)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()
