"""Do two trained adapters really differ on the held-out rows? Paired comparison of saved runs.

    .venv/bin/python bench/heldout_paired.py --run-config configs/cpu-reference.toml \\
        --run-config 'static.dataset.name="../shared/data/alpaca-gpt4/alpaca_en_demo.json"
                      static.dataset.validation-size=100' \\
        --adapter federated=<sweep>/<model>/train --adapter centralized=<sweep>/<model>/centralized

Each run's own held-out interval (in its metrics) spans the row-to-row spread of difficulty,
which is far wider than the differences between setups, so those intervals overlap whatever the
training did. Here every adapter (a run folder: its final adapter; or a `peft_<round>` folder)
and the base model are scored per row on the same held-out rows (the run config must be the one
the runs used), and each is compared with the base model and with the first adapter given:
difference of mean token losses with a bootstrap 95 % interval that resamples the rows once for
both (`heldout.paired_difference`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import final_adapter, offline, report


def adapter_file(path: Path) -> Path:
    """The adapter of a completed run folder (its final one) or of a `peft_<round>` folder."""
    from flowertune_nlp.outputs import ADAPTER_WEIGHTS

    if (path / "run.json").is_file():
        return final_adapter(path)
    target = path / ADAPTER_WEIGHTS
    if not target.is_file():
        raise SystemExit(f"{path}: no {ADAPTER_WEIGHTS} (give a run or peft_ folder)")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", action="append", default=[],
                        help="the runs' config: TOML files and key=value text")
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH",
                        help="an adapter to compare; the first is the reference")
    args = parser.parse_args()
    offline()
    from safetensors.torch import load_file

    from flowertune_nlp.config import build_config
    from flowertune_nlp.heldout import HeldOutEvaluator, paired_difference, score
    from flowertune_nlp.models import fresh_adapter, resolve_model_path
    from flowertune_nlp.run_config import merge_run_configs

    config = build_config(merge_run_configs(args.run_config))
    named = [item.split("=", 1) for item in args.adapter]
    if any(len(pair) != 2 for pair in named):
        raise SystemExit("--adapter takes NAME=PATH")
    evaluator = HeldOutEvaluator(config)
    base = fresh_adapter(resolve_model_path(config.model.name), config.model.lora, config.seed)
    losses = {"base": evaluator.example_losses(base)}
    for name, path in named:
        losses[name] = evaluator.example_losses(load_file(adapter_file(Path(path))))
    evaluator.close()
    tokens = losses["base"][1]
    reference = named[0][0]
    rows = []
    for name, (nll, _) in losses.items():
        own = score(nll, tokens, 0.0, seed=config.seed)
        rows.append({
            "adapter": name, "heldout_loss": round(own.loss, 4),
            "ci": [round(own.loss_ci_low, 4), round(own.loss_ci_high, 4)],
            "minus_base": paired_difference(losses["base"][0], nll, tokens, config.seed),
            "minus_reference": paired_difference(losses[reference][0], nll, tokens,
                                                 config.seed)})
    lines = [f"| adapter | held-out loss [95% CI] | minus base [paired 95% CI] | minus "
             f"{reference} [paired 95% CI] |", "|---|---|---|---|"]
    lines += [f"| {r['adapter']} | {r['heldout_loss']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] "
              f"| {r['minus_base'].as_text()} | {r['minus_reference'].as_text()} |" for r in rows]
    figures = {"benchmark": "heldout_paired", "rows": int(len(tokens)),
               "tokens": int(tokens.sum()), "adapters": [
                   {**r, "minus_base": vars(r["minus_base"]),
                    "minus_reference": vars(r["minus_reference"])} for r in rows]}
    report("\n".join(lines), figures)


if __name__ == "__main__":
    main()
