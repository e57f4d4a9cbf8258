"""What differential privacy costs in utility, and the epsilon it buys.

    .venv/bin/python bench/dp_utility.py [--noise 0,0.5,1.0] [--mode server-fixed]

`cpu-smoke`'s shape on SmolLM2-135M-Instruct, 5 partitions all trained every round, with
Flower's DP wrapper (`privacy.mode`, clipping norm `--clip`) for each noise multiplier: the
server's held-out loss after the last round (rows no client trains on), the clients' last train
loss, and the epsilon Flower's RDP accountant reports at delta 1e-5 (no sampling amplification
claimed). A run without DP is the reference.
"""

from __future__ import annotations

import argparse

from common import add_run_arguments, report, run_settings, smollm2_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise", default="0,0.5,1.0")
    parser.add_argument("--mode", default="server-fixed")
    parser.add_argument("--clip", type=float, default=0.05)
    add_run_arguments(parser)
    args = parser.parse_args()
    work, common = run_settings(args, "dp-utility-")
    variants = [("no DP", {})] + [
        (f"{args.mode}, noise {noise}", {"privacy.mode": args.mode,
                                         "privacy.clipping-norm": args.clip,
                                         "privacy.noise-multiplier": float(noise)})
        for noise in args.noise.split(",")]
    rows = []
    for index, (label, settings) in enumerate(variants):
        _, metrics = smollm2_run(work, f"run-{index}", {**common, **settings}, clients=5)
        last = metrics[-1]
        rows.append({"variant": label, "heldout_loss": last["heldout_loss"],
                     "heldout_ci": [last["heldout_loss_ci_low"], last["heldout_loss_ci_high"]],
                     "train_loss_last": last["train_loss"],
                     "epsilon": last.get("privacy_epsilon"), "delta": last.get("privacy_delta")})
    lines = ["| variant | held-out loss [95% CI] | last train loss | epsilon (delta 1e-5) |",
             "|---|---|---|---|"]
    for row in rows:
        low, high = row["heldout_ci"]
        epsilon = ("-" if "noise" not in row["variant"] else
                   "inf (no noise)" if row["epsilon"] is None else f"{row['epsilon']:.2f}")
        lines.append(f"| {row['variant']} | {row['heldout_loss']:.4f} [{low:.4f}, {high:.4f}] "
                     f"| {row['train_loss_last']:.4f} | {epsilon} |")
    report("\n".join(lines), {"benchmark": "dp_utility", "mode": args.mode, "clip": args.clip,
                              "rounds": args.rounds, "clients_per_round": 5, "runs": rows,
                              "work": str(work)})


if __name__ == "__main__":
    main()
