"""The same simulation on a Ray of its own and on an existing Ray cluster, side by side.

    .venv/bin/python bench/simulation_on_ray_cluster.py [--rounds 2]

`cpu-smoke`'s shape on SmolLM2-135M-Instruct (batch 4, 3 steps, length 256) with 2 partitions,
both trained every round, 1 CPU per client: once through the launcher as usual (its simulation
starts and stops a Ray of its own), then with `--ray-address` against a Ray head started here
beforehand on free loopback ports with this machine's CPUs (flowertune_nlp/ray_cluster.py, as
`ray start --head` on the first machine of the multi-machine recipe). Reports both wall times,
the head's start-up time (paid once per cluster, not per run) and whether the final adapters are
identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tomllib
from pathlib import Path

import psutil
from common import ALPACA_SAMPLE, ROOT, SMOLLM2, final_adapter, offline, report

from flowertune_nlp.launch import run_app
from flowertune_nlp.ray_cluster import RayHead


def settings(rounds: int, out: Path, name: str) -> dict:
    preset = tomllib.loads((ROOT / "configs" / "cpu-smoke.toml").read_text())
    return {**preset, "num-server-rounds": rounds, "model.name": SMOLLM2,
            "static.dataset.name": str(ALPACA_SAMPLE), "static.dataset.num-partitions": 2,
            "strategy.fraction-train": 1.0, "output-dir": str(out), "run-name": name}


def timed_run(rounds: int, work: Path, name: str, ray_address: str | None = None) -> float:
    start = time.perf_counter()
    outcome = run_app([settings(rounds, work, name)], num_supernodes=2, cpus_per_client=1,
                      ray_address=ray_address)
    if outcome.status != "completed":
        raise SystemExit(f"the {name} run ended {outcome.status}: {outcome.error}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    offline()
    work = Path(tempfile.mkdtemp(prefix="ray-cluster-"))
    local_wall = timed_run(args.rounds, work, "local")
    start = time.perf_counter()
    with RayHead(num_cpus=psutil.cpu_count() or 2) as head:
        head_seconds = time.perf_counter() - start
        cluster_wall = timed_run(args.rounds, work, "cluster", head.address)

    from safetensors.torch import load_file

    local = load_file(str(final_adapter(work / "local")))
    cluster = load_file(str(final_adapter(work / "cluster")))
    identical = set(local) == set(cluster) and all(
        (local[k] == cluster[k]).all().item() for k in local)
    figures = {"benchmark": "simulation_on_ray_cluster", "rounds": args.rounds,
               "clients_per_round": 2, "local_wall_s": round(local_wall, 1),
               "cluster_wall_s": round(cluster_wall, 1),
               "ratio_cluster_to_local": round(cluster_wall / local_wall, 2),
               "ray_head_start_s": round(head_seconds, 1),
               "final_adapters_identical": identical}
    report(f"simulation on its own Ray {local_wall:.1f} s, on an existing Ray cluster "
           f"{cluster_wall:.1f} s ({cluster_wall / local_wall:.2f}x; the head took "
           f"{head_seconds:.1f} s to start, once); identical adapters: {identical}", figures)


if __name__ == "__main__":
    main()
