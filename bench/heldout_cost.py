"""What held-out evaluation costs per round, next to what a round of training costs.

    .venv/bin/python bench/heldout_cost.py [--examples 40,200]

On `configs/cpu-reference.toml`'s shape (SmolLM2-135M-Instruct, 10 steps of batch 8 at length
256 per client, 2 clients per round), in one process: one client round (`train_round`, after a
warm-up round so the model load is not counted), then the server's held-out evaluation
(`heldout.HeldOutEvaluator`, model already loaded) of each number of held-out rows. A simulated
round trains its 2 clients one after the other on this machine's cores, so the round's training
time is taken as twice the client round; the ratio of each evaluation to it is the share of a
round it adds (start-up, averaging and saving not counted, which makes the ratio an upper
bound).
"""

from __future__ import annotations

import argparse
import time

from common import ALPACA_SAMPLE, ROOT, offline, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", default="40,200")
    args = parser.parse_args()
    offline()
    from flowertune_nlp.config import build_config, planned_clients_per_round
    from flowertune_nlp.heldout import HeldOutEvaluator
    from flowertune_nlp.nodes import Source
    from flowertune_nlp.run_config import merge_run_configs
    from flowertune_nlp.training import get_client_model, lora_state_dict, train_round

    base = {**merge_run_configs([str(ROOT / "configs" / "cpu-reference.toml")]),
            "static.dataset.name": str(ALPACA_SAMPLE)}
    sizes = [int(n) for n in args.examples.split(",")]
    config = build_config({**base, "static.dataset.validation-size": max(sizes)})
    state = lora_state_dict(get_client_model(config).model)
    train_round(config, Source(0), 1, 5e-5, state)  # warm-up: the model load and first step
    start = time.perf_counter()
    train_round(config, Source(1), 1, 5e-5, state)
    client_round = time.perf_counter() - start
    round_training = client_round * planned_clients_per_round(config)
    figures = {"benchmark": "heldout_cost", "client_round_s": round(client_round, 1),
               "round_training_s": round(round_training, 1), "evaluations": []}
    for size in sizes:
        evaluator = HeldOutEvaluator(build_config({**base,
                                                   "static.dataset.validation-size": size}))
        evaluator.load()
        score = evaluator(state)
        figures["evaluations"].append({
            "examples": score.examples, "tokens": score.tokens,
            "seconds": round(score.seconds, 1),
            "share_of_round": round(score.seconds / round_training, 3)})
        evaluator.close()
    lines = [f"{e['examples']} held-out rows: {e['seconds']} s = "
             f"{100 * e['share_of_round']:.1f} % of a round's training ({round_training:.1f} s)"
             for e in figures["evaluations"]]
    report("; ".join(lines), figures)


if __name__ == "__main__":
    main()
