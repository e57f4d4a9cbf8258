"""The same run in simulation and on Flower's Deployment Engine with cold and with warm nodes,
side by side.

    .venv/bin/python bench/deployment_vs_simulation.py [--rounds 3]

`cpu-smoke`'s shape on SmolLM2-135M-Instruct (batch 4, 3 steps, length 256) with 2 partitions,
both trained every round: once through the launcher's simulation (2 simulated nodes), then on a
local Deployment Engine federation (TLS, authenticated SuperNodes, one partition each) with warm
nodes (each node's worker process keeps the imported stack and the loaded model,
flowertune_nlp/warm_nodes.py), then with cold ones (`warm=false`: Flower's fresh `flwr-clientapp`
process per message imports torch, transformers and TRL and loads the model again every round).
Reports wall times and the deployments' ratios to the simulation (target for warm: <= 1.15), per
round the wall time, the slowest client's time inside its handler and the optimizer steps, the
peak summed RSS/PSS of each run's processes and of each node's (SuperNode, SuperExec, ClientApp
processes and its warm worker; sampled every 0.5 s), and for each message on a warm node where
its time went (waiting for its process, the process's start-up, the worker). All three train the
same partitions with the same seed, so their final adapters are compared too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import psutil
import tomli_w
from common import ALPACA_SAMPLE, ROOT, SMOLLM2, final_adapter, offline, report

from flowertune_nlp.federation import LocalFederation, marked_processes
from flowertune_nlp.warm_nodes import TIMING_PREFIX

Groups = Callable[[], dict[str, list[psutil.Process]]]


class PeakMemory:
    """Peak summed RSS and PSS of each group of processes `groups()` returns, and of all of them
    together (each process counted once), sampled in a thread."""

    def __init__(self, groups: Groups, interval: float = 0.5):
        self.groups, self.interval = groups, interval
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            totals: dict[str, dict[str, int]] = {"all": {"rss": 0, "pss": 0}}
            seen: set[int] = set()
            for name, members in self.groups().items():
                group = totals.setdefault(name, {"rss": 0, "pss": 0})
                for member in members:
                    with contextlib.suppress(psutil.Error):
                        info = member.memory_full_info()
                        group["rss"] += info.rss
                        group["pss"] += info.pss
                        if member.pid not in seen:
                            seen.add(member.pid)
                            totals["all"]["rss"] += info.rss
                            totals["all"]["pss"] += info.pss
            for name, group in totals.items():
                peak = self.peaks.setdefault(name, {"rss": 0, "pss": 0})
                peak.update({k: max(peak[k], v) for k, v in group.items()})
            self._stop.wait(self.interval)

    def gigabytes(self) -> dict[str, dict[str, float]]:
        return {name: {k: round(v / 2**30, 2) for k, v in peak.items()}
                for name, peak in self.peaks.items()}

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def warm_workers(owner: int) -> list[psutil.Process]:
    """The warm worker of the SuperNode `owner` (not its descendant once the ClientApp process
    that started it has exited)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        words = proc.info["cmdline"] or []
        if "flowertune_nlp.warm_worker" in words and str(owner) in words:
            found.append(proc)
    return found


TIMING = re.compile(re.escape(TIMING_PREFIX) + r" (\w+) message: waited ([\d.]+) s .*?, "
                    r"([\d.]+) s to reach .*?, ([\d.]+) s in the worker")


def message_timings(log: Path) -> list[dict]:
    """Each message's time on a warm node, from its log: waiting for its process (SuperNode
    and SuperExec polls), the process's start-up, the worker's handling."""
    return [{"message": m[1], "wait_s": float(m[2]), "startup_s": float(m[3]),
             "worker_s": float(m[4])} for m in TIMING.finditer(log.read_text(errors="replace"))]


def settings(rounds: int, out: Path, name: str) -> dict:
    preset = tomllib.loads((ROOT / "configs" / "cpu-smoke.toml").read_text())
    return {**preset, "num-server-rounds": rounds, "model.name": SMOLLM2,
            "static.dataset.name": str(ALPACA_SAMPLE), "static.dataset.num-partitions": 2,
            "strategy.fraction-train": 1.0, "federation.min-nodes": 2,
            "output-dir": str(out), "run-name": name}


def rounds_of(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"round": r["round"], "wall_s": round(r["wall_seconds"], 1),
             "client_handler_s_max": round(r["client_seconds_max"], 1),
             "train_s_sum": round(r["client_train_seconds_sum"], 1)} for r in rows]


def simulate(rounds: int, work: Path) -> tuple[float, PeakMemory]:
    config = work / "simulation.toml"
    config.write_text(tomli_w.dumps(settings(rounds, work, "simulation")))
    start = time.perf_counter()
    launcher = subprocess.Popen([sys.executable, "-m", "flowertune_nlp.launch",
                                 "--num-supernodes", "2", "--run-config", str(config)],
                                cwd=ROOT)
    with PeakMemory(lambda: {"simulation": tree(launcher.pid)}) as memory:
        launcher.wait()
    if launcher.returncode:
        raise SystemExit(f"the simulation failed (exit {launcher.returncode})")
    return time.perf_counter() - start, memory


def deploy(rounds: int, work: Path, name: str, warm: bool
           ) -> tuple[float, float, PeakMemory, dict[str, list[dict]]]:
    """(seconds to start the federation, seconds of `flwr run`, its peak memory, each node's
    message timings where it is warm)."""
    config = work / f"{name}.toml"
    config.write_text(tomli_w.dumps(settings(rounds, work, name)))
    nodes = [{"partition-id": p, "num-partitions": 2, "warm": warm} for p in range(2)]
    # One core per node: the 2 nodes train at once on this machine's cores, as the simulation's
    # clients train one after another on all of them.
    threads = max(1, (psutil.cpu_count() or 2) // len(nodes))
    folder = work / f"{name}-federation"
    start = time.perf_counter()
    with LocalFederation(folder, nodes, threads_per_node=threads) as fed:
        up_seconds = time.perf_counter() - start

        def groups() -> dict[str, list[psutil.Process]]:
            found = {node.name: tree(node.pid) + warm_workers(node.pid) for node in fed.nodes}
            return {**found, "federation": marked_processes(folder)}

        start = time.perf_counter()
        with PeakMemory(groups) as memory:
            done = subprocess.run(fed.run_command(ROOT, str(config)), env=fed.env,
                                  capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"the {name} deployment run failed: {done.stdout[-2000:]}")
    timings = {node.name: message_timings(node.log) for node in fed.nodes}
    return up_seconds, seconds, memory, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    offline()
    work = Path(tempfile.mkdtemp(prefix="deploy-vs-sim-"))
    sim_wall, sim_memory = simulate(args.rounds, work)
    runs = {name: deploy(args.rounds, work, name, warm=name == "warm")
            for name in ("warm", "cold")}

    from safetensors.torch import load_file

    adapters = {name: load_file(str(final_adapter(work / name)))
                for name in ("simulation", "warm", "cold")}
    reference = adapters["simulation"]
    identical = all((adapter[k] == reference[k]).all().item()
                    for adapter in adapters.values() for k in reference)
    figures = {"benchmark": "deployment_vs_simulation", "rounds": args.rounds,
               "clients_per_round": 2, "simulation_wall_s": round(sim_wall, 1),
               "simulation_rounds": rounds_of(work / "simulation"),
               "simulation_peak_gb": sim_memory.gigabytes()["all"],
               "final_adapters_identical": identical}
    for name, (up_seconds, seconds, memory, timings) in runs.items():
        peaks = memory.gigabytes()
        figures |= {f"{name}_run_wall_s": round(seconds, 1), f"{name}_up_s": round(up_seconds, 1),
                    f"{name}_ratio_to_simulation": round(seconds / sim_wall, 2),
                    f"{name}_rounds": rounds_of(work / name),
                    f"{name}_peak_gb": peaks.pop("all"),
                    f"{name}_peak_gb_per_node": {k: v for k, v in peaks.items()
                                                 if k != "federation"}}
        if any(timings.values()):
            figures[f"{name}_message_timings_per_node"] = timings
    report(f"simulation {sim_wall:.1f} s; warm deployment {figures['warm_run_wall_s']} s "
           f"({figures['warm_ratio_to_simulation']}x); cold deployment "
           f"{figures['cold_run_wall_s']} s ({figures['cold_ratio_to_simulation']}x); peak PSS "
           f"simulation {figures['simulation_peak_gb']['pss']}, warm "
           f"{figures['warm_peak_gb']['pss']}, cold {figures['cold_peak_gb']['pss']} GB; "
           f"identical adapters: {identical}", figures)


if __name__ == "__main__":
    main()
