"""The same `flwr run` simulation on an existing Ray cluster (a head started on free loopback
ports, as `ray start --head` on the first machine of the multi-machine recipe): its clients run
as actors of that cluster, the final adapter equals the local simulation's, and stopping the head
leaves no Ray process behind."""

import threading

import psutil
import pytest
import torch
from flower_runs import flower_processes, tiny_settings
from test_deployment import final_adapter

from flowertune_nlp.launch import run_app
from flowertune_nlp.ray_cluster import RayHead

pytestmark = pytest.mark.slow
SHAPE = {"static.dataset.num-partitions": 2, "strategy.fraction-train": 1.0}


def gcs_servers(processes: list[psutil.Process]) -> set[int]:
    found = set()
    for proc in processes:
        try:
            if "gcs_server" in " ".join(proc.cmdline())[:200]:
                found.add(proc.pid)
        except psutil.Error:
            pass
    return found


def watched_run(head: RayHead, settings: dict, ray_address: str | None
                ) -> tuple[set[int], set[int]]:
    """Run the simulation; return the ClientApp actors seen on the head's raylet and the Ray
    GCS servers the run started itself (as this process's descendants), sampled every 0.5 s."""
    head_gcs = gcs_servers(head.processes())
    actors: set[int] = set()
    own_clusters: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            for proc in head.processes():
                try:
                    if proc.name().startswith("ray::ClientAppActor"):
                        actors.add(proc.pid)
                except psutil.Error:
                    pass
            own_clusters.update(gcs_servers(psutil.Process().children(recursive=True))
                                - head_gcs)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        outcome = run_app([settings], num_supernodes=2, cpus_per_client=1,
                          ray_address=ray_address)
    finally:
        done.set()
        watcher.join()
    assert outcome.status == "completed", outcome.error
    return actors, own_clusters


def test_simulation_joins_an_existing_ray_cluster_and_trains_the_same_adapter(
        tiny_model_dir, alpaca_sample, tmp_path):
    with RayHead(num_cpus=2) as head:
        head_processes = head.processes()
        assert gcs_servers(head_processes)  # the head's own GCS
        # without an address the launcher's simulation starts a Ray of its own ...
        actors, own = watched_run(head, tiny_settings(tiny_model_dir, alpaca_sample, tmp_path,
                                                      "local", **SHAPE), None)
        assert own and not actors
        # ... with the head's address its clients run on the head, and it starts none
        actors, own = watched_run(head, tiny_settings(tiny_model_dir, alpaca_sample, tmp_path,
                                                      "cluster", **SHAPE), head.address)
        assert actors and not own
        assert head.ready()  # the cluster outlives the run
    assert not [p for p in head_processes if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    assert head.temp_dir is not None and not head.temp_dir.exists()
    assert not [c for c in flower_processes() if str(head.port) in c]

    expected, got = final_adapter(tmp_path / "local"), final_adapter(tmp_path / "cluster")
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
