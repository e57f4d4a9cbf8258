"""`python -m evaluation.curve`: score the base model and every checkpoint a training run saved,
on the same MMLU questions, and write the rounds-vs-score curve.

    python -m evaluation.curve --run-dir results/cpu-ref --mmlu-path ../shared/data/mmlu \\
        --limit-per-subject 10

Reads the base model and the checkpoints from the run's run.json and metrics.jsonl; writes
`<run-dir>/evaluation/round_<N>.json` (round 0 is the base model) with their predictions, and
`curve.json`, `curve.md` and `curve.png` next to them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from evaluation.mmlu import (
    CATEGORY_TITLES,
    LEADERBOARD_CATEGORIES,
    load_questions,
    parse_categories,
)
from evaluation.runner import (
    PROTOCOLS,
    AdapterError,
    EvalRequest,
    attach_adapter,
    check_request,
    load_base,
    score,
)
from flowertune_nlp.cli import ArgumentParser
from flowertune_nlp.io import atomic_write_figure, atomic_write_json, atomic_write_text
from flowertune_nlp.models import release_memory
from flowertune_nlp.outputs import current_status

CATEGORY_KEYS = LEADERBOARD_CATEGORIES


def checkpoints(run_dir: Path) -> tuple[str, dict[int, str], dict[int, float]]:
    """(base model, {round: adapter folder}, {round: cumulative MB}) of a finished run."""
    record = json.loads((run_dir / "run.json").read_text())
    if (status := current_status(record)) != "completed":
        raise ValueError(f"{run_dir / 'run.json'} has status {status!r}; "
                         "finish (or resume) the run first")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    adapters = {int(r): path for r, path in record["adapters"].items()}
    comm = {0: 0.0, **{row["round"]: row["comm_mb_total"] for row in rows}}
    return record["config"]["model"]["name"], dict(sorted(adapters.items())), comm


def row_for(server_round: int, comm_mb: float, result: dict) -> dict:
    row = {"round": server_round, "comm_mb": round(comm_mb, 2)}
    for protocol, summary in result["protocols"].items():
        for key in CATEGORY_KEYS:
            score = summary["categories"][key]
            row[f"{protocol}_{key}"] = round(100 * score["accuracy"], 2)
            row[f"{protocol}_{key}_ci95"] = [round(100 * x, 2) for x in score["ci95"]]
        row[f"{protocol}_average"] = round(100 * summary["average"], 2)
        overall = summary["overall"]
        row[f"{protocol}_overall_ci95"] = [round(100 * x, 2) for x in overall["ci95"]]
        if protocol == "flowertune":
            row["flowertune_parse_failure_rate"] = round(summary["parse_failure_rate"], 3)
    return row


def markdown(rows: list[dict], protocols: tuple[str, ...]) -> str:
    head = ["Round", "Comm MB"]
    for protocol in protocols:
        head += [f"{protocol} {CATEGORY_TITLES[k]}" for k in CATEGORY_KEYS]
        head.append(f"{protocol} Average")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = ["base" if row["round"] == 0 else str(row["round"]), f"{row['comm_mb']:.1f}"]
        for protocol in protocols:
            for key in CATEGORY_KEYS:
                low, high = row[f"{protocol}_{key}_ci95"]
                cells.append(f"{row[f'{protocol}_{key}']:.1f} [{low:.0f}–{high:.0f}]")
            cells.append(f"{row[f'{protocol}_average']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], protocols: tuple[str, ...], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.2), squeeze=False)
    rounds = [r["round"] for r in rows]
    for ax, protocol in zip(axes[0], protocols, strict=True):
        for key in CATEGORY_KEYS:
            values = [r[f"{protocol}_{key}"] for r in rows]
            low = [r[f"{protocol}_{key}_ci95"][0] for r in rows]
            high = [r[f"{protocol}_{key}_ci95"][1] for r in rows]
            ax.plot(rounds, values, marker="o", label=key)
            ax.fill_between(rounds, low, high, alpha=0.12)
        ax.plot(rounds, [r[f"{protocol}_average"] for r in rows], color="black", marker="s",
                label="average")
        ax.axhline(25, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set(title=f"MMLU ({protocol}) by round, 95% CI", xlabel="round (0 = base model)",
               ylabel="accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(target, fig)
    plt.close(fig)


def score_checkpoints(template: EvalRequest, adapters: dict[int, str], comm: dict[int, float],
                      out: Path) -> list[dict]:
    """Score the base model and each adapter, printing each row as it comes. The base is loaded
    once; each adapter is attached to it, scored and unloaded again: one model in memory,
    however many checkpoints."""
    questions = load_questions(template.mmlu_path, parse_categories(",".join(template.categories)),
                               template.limit_per_subject)
    model, tokenizer, precision = load_base(template)
    rows = []
    try:
        for server_round, adapter in {0: None, **adapters}.items():
            request = dataclasses.replace(template, peft_path=adapter,
                                          run_name=f"round_{server_round}",
                                          output=str(out / f"round_{server_round}.json"))
            if adapter:
                model = attach_adapter(model, adapter, template.base_model, False)
            result = score(request, model, tokenizer, precision, questions)
            if adapter:
                model = model.unload()  # the base again, without this round's LoRA layers
            rows.append(row_for(server_round, comm.get(server_round, 0.0), result))
            print(markdown(rows[-1:], template.protocols).splitlines()[-1], flush=True)
    finally:
        del model
        release_memory()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m evaluation.curve",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a completed training run folder")
    parser.add_argument("--mmlu-path", required=True, help="local MMLU folder or hub id")
    parser.add_argument("--limit-per-subject", type=int, default=None)
    parser.add_argument("--protocol", default="flowertune,logprob")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    protocols = tuple(p.strip() for p in args.protocol.split(",") if p.strip())
    run_dir = Path(args.run_dir).resolve()
    out = run_dir / "evaluation"
    try:
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown:
            raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
        base, adapters, comm = checkpoints(run_dir)
        template = EvalRequest(base_model=base, protocols=protocols, batch_size=args.batch_size,
                               mmlu_path=args.mmlu_path, limit_per_subject=args.limit_per_subject,
                               progress=False)
        check_request(template)
        rows = score_checkpoints(template, adapters, comm, out)
    except (OSError, ValueError, KeyError, AdapterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    atomic_write_json(out / "curve.json", {"run_dir": str(run_dir), "base_model": base,
                                           "limit_per_subject": args.limit_per_subject,
                                           "rows": rows})
    table = markdown(rows, protocols)
    atomic_write_text(out / "curve.md", table)
    plot(rows, protocols, out / "curve.png")
    print(table + f"written: {out / 'curve.md'}, {out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
