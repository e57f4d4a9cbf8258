"""The two baselines a federated run is judged against, trained without a federation (there is
nothing to federate) with the same model, LoRA, learning-rate schedule and total number of
examples processed per round as the federated run of the same config:

- `centralized`: one trainer on the pooled training rows (every partition together; the held-out
  rows stay out), `clients per round x max-steps` steps per round;
- `local`: one data holder alone on its own partition, the same steps per round, for each of a
  few partitions (the held-out loss of local training is their mean, with its range).

Each writes a run folder like the ServerApp's (`run.json`, `metrics.jsonl` with the held-out
loss per round, `peft_<round>/`), so the sweep evaluates and tabulates it the same way.

    python -m flowertune_nlp.baselines --kind centralized --run-config configs/cpu-smoke.toml \\
        --run-config 'static.dataset.validation-size=100' --output results/centralized
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

from flowertune_nlp.cli import ArgumentParser
from flowertune_nlp.config import (
    AppConfig,
    ConfigError,
    PrivacySettings,
    RunSettings,
    StrategySettings,
    build_config,
    planned_clients_per_round,
)
from flowertune_nlp.nodes import Source
from flowertune_nlp.run_config import merge_run_configs

log = logging.getLogger(__name__)
KINDS = ("centralized", "local")


def baseline_config(config: AppConfig, kind: str, output: Path) -> AppConfig:
    """The federated config turned into the baseline's: K x max-steps steps per round, and for
    `centralized` one partition holding every training row."""
    steps = config.train.max_steps * planned_clients_per_round(config)
    # Nothing is aggregated, privatised, resumed or faulted: those settings do not apply.
    config = dataclasses.replace(
        config, output_dir=str(output.parent), run_name=output.name,
        train=dataclasses.replace(config.train, max_steps=steps), run=RunSettings(),
        strategy=StrategySettings(), privacy=PrivacySettings(), faults=())
    if kind == "centralized":
        config = dataclasses.replace(config, dataset=dataclasses.replace(
            config.dataset, num_partitions=1, partitioner="iid"))
    return config


def local_partitions(text: str, num_partitions: int) -> list[int]:
    """`--local-partitions` ("0,1,2") as partition ids, each checked against the federation."""
    try:
        partitions = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--local-partitions {text!r}: give partition ids separated by "
                          "commas, e.g. 0,1,2") from None
    bad = [p for p in partitions if not 0 <= p < num_partitions]
    if bad or not partitions:
        raise ConfigError(f"--local-partitions {bad or text!r} are not partitions of "
                          f"static.dataset.num-partitions = {num_partitions}")
    return partitions


def train_alone(config: AppConfig, sources: list[Source]) -> Path:
    """Train one adapter per source through the schedule, scoring each round on the held-out
    rows; write the run folder (the first source's adapters; every source's loss)."""
    from flowertune_nlp.heldout import HeldOutEvaluator
    from flowertune_nlp.models import fresh_adapter, resolve_model_path
    from flowertune_nlp.outputs import RunOutputs
    from flowertune_nlp.round_driver import round_learning_rate
    from flowertune_nlp.training import train_round

    outputs = RunOutputs.create(config)
    heldout = HeldOutEvaluator(config)
    initial = fresh_adapter(resolve_model_path(config.model.name), config.model.lora,
                            config.seed)
    base = heldout(initial).as_row()
    outputs.record["heldout_base"] = base
    states = {source: {k: v.clone() for k, v in initial.items()} for source in sources}
    t = config.train
    try:
        for server_round in range(1, config.num_server_rounds + 1):
            start = time.perf_counter()
            lr = round_learning_rate(server_round, config.num_server_rounds,
                                     t.learning_rate_max, t.learning_rate_min)
            results, scores = [], []
            for source in sources:
                result = train_round(config, source, server_round, lr, states[source])
                states[source] = result.state
                results.append(result)
                scores.append(heldout(result.state))
            row = {"round": server_round, "sources": [s.label for s in sources],
                   "learning_rate": lr, "examples": results[0].num_examples,
                   "train_loss": sum(r.train_loss for r in results) / len(results),
                   "heldout_loss_per_source": [s.loss for s in scores]}
            if len(scores) == 1:
                row.update(scores[0].as_row())
            else:  # several holders alone: their mean and range (intervals do not average)
                losses = [s.loss for s in scores]
                row.update(heldout_loss=sum(losses) / len(losses),
                           heldout_loss_min=min(losses), heldout_loss_max=max(losses),
                           heldout_examples=scores[0].examples)
            row["wall_seconds"] = time.perf_counter() - start
            last = server_round == config.num_server_rounds
            if server_round % t.save_every_round == 0 or last:
                outputs.save_checkpoint(server_round, states[sources[0]])
            outputs.append_metrics(row)
            log.info("round %d: held-out loss %.4f", server_round, row["heldout_loss"])
    except BaseException as err:
        outputs.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        heldout.close()
    outputs.finish("completed", rounds=config.num_server_rounds, comm_bytes_total=0,
                   comm_mb_total=0.0, baseline_sources=[s.label for s in sources])
    return outputs.directory


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--run-config", action="append", default=[],
                        help="the federated run's config: TOML files and key=value text")
    parser.add_argument("--output", required=True, type=Path, help="the run folder to write")
    parser.add_argument("--local-partitions", default="0,1,2",
                        help="`local`: the partitions that each train alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        federated = build_config(merge_run_configs(args.run_config))
        if not federated.dataset.validation_size:
            raise ConfigError("run config key 'static.dataset.validation-size' = 0: baselines "
                              "are compared on the held-out rows; set a validation size")
        config = baseline_config(federated, args.kind, args.output.expanduser().resolve())
        if args.kind == "centralized":
            sources = [Source(0)]
        else:
            sources = [Source(p) for p in local_partitions(args.local_partitions,
                                                           config.dataset.num_partitions)]
        if (args.output / "run.json").exists():
            raise ConfigError(f"{args.output} already holds a run; choose another --output")
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(train_alone(config, sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
