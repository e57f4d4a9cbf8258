"""What one poisoned client does to the global adapter under each aggregation rule.

    .venv/bin/python bench/robust_aggregation.py [--attack scale=10] [--rounds 3]

`cpu-smoke`'s shape on SmolLM2-135M-Instruct: 5 partitions, all 5 trained every round, one of
them (partition 0) an attacker whose replies look well-formed (`faults.inject`: its update
scaled, sign-flipped or noised), so screening lets it through. For each rule, a clean run and an
attacked run: the distance (the L2 norm over all LoRA tensors) of each final global adapter
from the clean FedAvg run's and, for an attacked run, from the same rule's clean run (what the
attacker moved that rule), and the server's held-out loss after the last round (on rows no
client trains on, `static.dataset.validation-size`).
"""

from __future__ import annotations

import argparse

from common import add_run_arguments, final_adapter, report, run_settings, smollm2_run
from safetensors.torch import load_file

RULES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")


def distance(one: dict, other: dict) -> float:
    return sum(float((one[k] - other[k]).pow(2).sum()) for k in one) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", default="scale=10", help="KIND[=VALUE] of faults.inject")
    parser.add_argument("--rules", default=",".join(RULES))
    add_run_arguments(parser)
    args = parser.parse_args()
    work, common = run_settings(args, "robust-aggregation-")
    rows, adapters = {}, {}
    for rule in args.rules.split(","):
        for attacked in (False, True):
            name = f"{rule}-{'attacked' if attacked else 'clean'}"
            settings = {**common, "strategy.name": rule}
            if attacked:
                settings["faults.inject"] = f"{args.attack}:0:*"
            run_dir, metrics = smollm2_run(work, name, settings, clients=5)
            adapters[name] = load_file(str(final_adapter(run_dir)))
            last = metrics[-1]
            rows[name] = {"rule": rule, "attacked": attacked,
                          "heldout_loss": last["heldout_loss"],
                          "heldout_ci": [last["heldout_loss_ci_low"],
                                         last["heldout_loss_ci_high"]],
                          "rejected": sum(r["rejected"] for r in metrics),
                          "train_loss_last": last["train_loss"]}
    reference = adapters["fedavg-clean"]
    for name, row in rows.items():
        row["distance_from_clean_fedavg"] = distance(adapters[name], reference)
        row["distance_from_same_rule_clean"] = (
            distance(adapters[name], adapters[f"{row['rule']}-clean"]) if row["attacked"]
            else None)
    lines = ["| rule | attacked | distance from clean FedAvg | distance from the same rule "
             "clean | held-out loss [95% CI] |", "|---|---|---|---|---|"]
    for row in rows.values():
        low, high = row["heldout_ci"]
        own = row["distance_from_same_rule_clean"]
        lines.append(f"| {row['rule']} | {'yes' if row['attacked'] else 'no'} | "
                     f"{row['distance_from_clean_fedavg']:.4f} | "
                     f"{'' if own is None else f'{own:.4f}'} | {row['heldout_loss']:.4f} "
                     f"[{low:.4f}, {high:.4f}] |")
    report("\n".join(lines), {"benchmark": "robust_aggregation", "attack": args.attack,
                              "rounds": args.rounds, "clients_per_round": 5,
                              "attackers": 1, "runs": rows, "work": str(work)})


if __name__ == "__main__":
    main()
