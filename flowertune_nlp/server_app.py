"""ServerApp: build the config, make the initial adapter, drive the rounds with the chosen
aggregation rule over the nodes there are, record the outcome."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from flowertune_nlp.aggregation import build_rule
from flowertune_nlp.comm import MB, TRANSPORT_BYTES, expected_total_bytes
from flowertune_nlp.config import build_config, planned_clients_per_round
from flowertune_nlp.data import partition_report
from flowertune_nlp.heldout import HeldOutEvaluator
from flowertune_nlp.logs import use_flower_log_handlers
from flowertune_nlp.models import fetch_base_model, fresh_adapter, resolve_model_path
from flowertune_nlp.nodes import NodeDirectory
from flowertune_nlp.outputs import RunOutputs
from flowertune_nlp.round_driver import RoundDriver, RunStopped
from flowertune_nlp.run_state import open_resumable

log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    use_flower_log_handlers()
    config = build_config(context.run_config)
    if config.run.resume:
        # Every check runs before the run folder is touched: a refused resume changes nothing.
        run_dir, resumed, changed = open_resumable(config)
        if changed:
            log.warning("resuming with changed settings %s: the run continues, but not exactly "
                        "as the original would have", changed)
        outputs = RunOutputs.resume(config, run_dir, resumed.metrics, changed)
        log.info("resuming %s after round %d", run_dir, resumed.server_round)
    else:
        resumed = None
        outputs = RunOutputs.create(config)
    log.info("run folder: %s", outputs.directory)
    driver: RoundDriver | None = None
    try:
        # Flower runs every simulation (`flwr run` on a simulation SuperLink, or
        # run_simulation) on an in-memory grid; a deployment talks to its SuperLink instead.
        simulated = isinstance(grid, InMemoryGrid)
        log.info("%s: %s", "simulation" if simulated else "deployment",
                 "nodes are workers for the partitions" if simulated
                 else "every node trains the data its operator gave it")
        # Both convert a GGUF base once, before any client needs it; in simulation the clients
        # share this machine's cache, so a hub model is downloaded here, once, too.
        if simulated and not resumed:
            # Every partition is built here once: a bad partitioning stops the run before any
            # client trains, and the run folder shows what each client holds.
            report = partition_report(config)
            outputs.write_json("partitions.json", report)
            sizes = [p["size"] for p in report["partitions"]]
            log.info("%s partitions: %d to %d rows, %d held out; see partitions.json",
                     config.dataset.partitioner, min(sizes), max(sizes),
                     report["validation_rows"])
        model_path = (fetch_base_model if simulated else resolve_model_path)(config.model.name)
        initial = resumed.global_state if resumed else fresh_adapter(
            model_path, config.model.lora, config.seed)
        nodes = NodeDirectory(grid, simulated, config.dataset.num_partitions,
                              config.federation.min_nodes, config.federation.wait_seconds)
        if simulated:  # a deployment's clients per round depend on the nodes that join
            planned = expected_total_bytes(
                [tuple(v.shape) for v in initial.values()], config.num_server_rounds,
                planned_clients_per_round(config), TRANSPORT_BYTES[config.comm.transport])
            log.info("planned communication by the published formula: %.2f MB", planned / MB)
        rule = build_rule(config, planned_clients_per_round(config),
                          population=config.dataset.num_partitions)
        heldout = HeldOutEvaluator(config) if config.dataset.validation_size else None
        driver = RoundDriver(config, outputs, nodes, rule, resumed, heldout)
        driver.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=driver.rounds_left,
            train_config=ConfigRecord(),
            evaluate_fn=driver.end_of_round,
        )
    except RunStopped as err:
        last = len(outputs.metrics)  # the last completed round: its adapter is the result
        if driver and last and str(last) not in outputs.record["adapters"]:
            outputs.save_checkpoint(last, driver.global_arrays.to_torch_state_dict())
        outputs.finish("stopped", error=str(err), **driver.privacy.spent() if driver else {})
        log.info("run stopped: %s (continue with run.resume=\"%s\")", outputs.directory,
                 outputs.directory)
        raise
    except BaseException as err:
        outputs.finish("failed", error=f"{type(err).__name__}: {err}")
        log.error("run failed: %s", outputs.directory)
        raise
    outputs.finish(
        "completed",
        rounds=config.num_server_rounds,
        comm_bytes_total=driver.ledger.total_bytes,
        comm_mb_total=driver.ledger.total_bytes / MB,
        **driver.privacy.spent(),
    )
    log.info("run completed: %s (final adapter %s)", outputs.directory,
             outputs.record.get("final_adapter"))
