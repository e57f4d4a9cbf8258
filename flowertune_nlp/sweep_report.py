"""The sweep's results: one table row per model x task x setup (CSV, JSON, Markdown) and a
picture per task, read from the files the runs wrote (pair.json, run.json, metrics.jsonl, the
evaluation JSON), never scraped from output."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from evaluation.tasks_runner import score_table
from flowertune_nlp.io import atomic_write_figure, atomic_write_json, atomic_write_text
from flowertune_nlp.names import model_slug
from flowertune_nlp.tasks import TASKS

SETUP_ORDER = ("base", "local", "federated", "centralized")
PROTOCOL_TITLES = {"leaderboard": "Leaderboard", "robust": "Robust"}
# The leaderboard's published baselines: Mistral-7B-v0.3, default template, 200 rounds, on GPU.
PUBLISHED_BASELINES = {
    "general_nlp": {"STEM": 12.37, "Social Sciences": 13.49, "Humanities": 12.60,
                    "mean": 12.82},
    "finance": {"FPB": 44.55, "FiQA": 62.50, "TFNS": 28.77, "mean": 45.27},
    "medical": {"PubMedQA": 59.00, "MedMCQA": 23.69, "MedQA": 27.10, "CareQA": 21.47,
                "mean": 32.82},
    "code": {"MBPP": 31.60, "HumanEval": 23.78, "MultiPL-E JS": 28.57, "MultiPL-E C++": 25.47,
             "mean": 27.36},
}


def heldout_cell(metrics_file: str | None, run_file: str | None = None) -> str | None:
    """The held-out loss [95 % CI] after the last round (or of the base model in run.json)."""
    if run_file:
        scored = (json.loads(Path(run_file).read_text()).get("heldout_base")
                  if Path(run_file).is_file() else None)
    elif metrics_file and Path(metrics_file).is_file():
        lines = Path(metrics_file).read_text().splitlines()
        scored = json.loads(lines[-1]) if lines else None
    else:
        return None
    if not scored or "heldout_loss" not in scored:
        return None
    if "heldout_loss_min" in scored:  # local training: mean over the holders and their range
        return (f"{scored['heldout_loss']:.4f} (range {scored['heldout_loss_min']:.4f}–"
                f"{scored['heldout_loss_max']:.4f} over "
                f"{len(scored['heldout_loss_per_source'])} holders)")
    return (f"{scored['heldout_loss']:.4f} [{scored['heldout_loss_ci_low']:.4f}, "
            f"{scored['heldout_loss_ci_high']:.4f}]")


def _scores(part: dict) -> dict:
    eval_file = part.get("eval_file")
    if eval_file and Path(eval_file).is_file():
        return score_table(json.loads(Path(eval_file).read_text()))
    return {}


def _cells(row: dict) -> str:
    return " · ".join(f"{title} {value:.2f}" for title, value in row["subscores"].items())


def result_row(state: dict, setup: str = "federated") -> dict:
    """One table row: a pair's federated run, or one of its setups (base, local,
    centralized)."""
    part = state if setup == "federated" else state["setups"][setup]
    row = {"Model": model_slug(state["model"]), "Task": state["task"], "Setup": setup,
           "Status": state["status"] if setup == "federated" else part.get("status",
                                                                           state["status"])}
    scores = _scores(part)
    for protocol, title in PROTOCOL_TITLES.items():
        scored = scores.get(protocol)
        row[title] = _cells(scored) if scored else None
        row[f"{title} mean"] = scored["mean"] if scored else None
    not_run = sorted({t for s in scores.values() for t in s["not_run"]})
    row["Not run"] = ", ".join(not_run) or None
    row["Held-out loss [95% CI or range]"] = heldout_cell(part.get("metrics_file"),
                                                          part.get("heldout_from"))
    row["Comm. Costs (MB)"] = (round(part["comm_mb"], 2) if part.get("comm_mb") is not None
                               and setup != "base" else None)
    row["Rounds"] = state.get("rounds") if setup != "base" else 0
    seconds = (part.get("train_seconds") or 0) + (part.get("eval_seconds") or 0)
    row["Wall time (s)"] = round(seconds, 1) if seconds else None
    row["Items per set"] = part.get("eval_limit") or "all"
    row["Training data"] = state.get("training_data")
    row["Model source"] = state["model"]
    row["Error"] = part.get("error") or (state.get("error") if setup == "federated" else None)
    return row


def result_rows(state: dict) -> list[dict]:
    setups = {"federated", *state.get("setups", {})}
    return [result_row(state, setup) for setup in SETUP_ORDER if setup in setups]


HIDDEN_IN_MARKDOWN = ("Error", "Model source", "Training data")


def _markdown_cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column.endswith(" mean"):  # scores in %, as their sub-scores: 35.00, not 35.0
        return f"{value:.2f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    columns = [c for c in rows[0] if c not in HIDDEN_IN_MARKDOWN]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(c, row[c]) for c in columns) + " |")
    notes = ["", "Scores in % (code: pass@1). Leaderboard: the FlowerTune leaderboard's own "
             "protocol, quirks included; Robust: log-likelihood over the answer set (general "
             "NLP, finance, medical) or greedy pass@1 (code). Means are unweighted over the "
             "sets that ran."]
    data = sorted({(r["Task"], r["Training data"]) for r in rows if r["Training data"]})
    notes += [f"- {task}: trained on {source}" for task, source in data]
    published = sorted({r["Task"] for r in rows} & set(PUBLISHED_BASELINES))
    if published:
        notes += ["", "Published leaderboard baselines (Mistral-7B-v0.3 on GPU, 200 rounds; "
                  "not comparable in size or schedule):"]
        notes += [f"- {t}: " + " · ".join(f"{k} {v:.2f}" for k, v in
                                          PUBLISHED_BASELINES[t].items()) for t in published]
    errors = [f"- {r['Model']} {r['Task']} {r['Setup']}: {r['Error']}" for r in rows
              if r.get("Error")]
    return "\n".join(lines + notes + (["", "Failures:", *errors] if errors else [])) + "\n"


def heldout_curve(metrics_file: Path) -> tuple[list[int], list[float], list[float], list[float]]:
    """Rounds, held-out loss and its band (95 % CI, or the range over local holders) of one
    run, from round 0 (the base model, in run.json) on; empty without held-out scoring."""
    run_file = metrics_file.with_name("run.json")
    base = json.loads(run_file.read_text()).get("heldout_base") if run_file.is_file() else None
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    scored = ([{"round": 0, **base}] if base else []) + [r for r in rows if "heldout_loss" in r]
    low = [r.get("heldout_loss_min", r.get("heldout_loss_ci_low", r["heldout_loss"]))
           for r in scored]
    high = [r.get("heldout_loss_max", r.get("heldout_loss_ci_high", r["heldout_loss"]))
            for r in scored]
    return [r["round"] for r in scored], [r["heldout_loss"] for r in scored], low, high


def _empty(ax, why: str) -> None:
    """A panel with no data says why instead of showing empty axes."""
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, fontsize=9, color="grey",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_task(states: list[dict], task: str, target: Path) -> None:
    """One task's picture: train loss, held-out loss (round 0 = base), cumulative
    communication, and the scores of every setup (base against tuned) for both protocols."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ((loss_ax, heldout_ax), (comm_ax, score_ax)) = plt.subplots(2, 2, figsize=(16, 9))
    fig.suptitle(f"{TASKS[task].title}: did federated tuning help?")
    bars: list[tuple[str, dict]] = []
    for state in states:
        name = model_slug(state["model"])
        metrics_file = Path(state.get("metrics_file") or "/nonexistent")
        if metrics_file.is_file():
            rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
            rounds = [r["round"] for r in rows]
            loss_ax.plot(rounds, [r.get("train_loss") for r in rows], marker="o", label=name)
            comm_ax.plot(rounds, [r["comm_mb_total"] for r in rows], marker="o", label=name)
        setups = {"federated": state, **state.get("setups", {})}
        for setup in SETUP_ORDER:
            part = setups.get(setup)
            if part is None:
                continue
            scores = _scores(part)
            if scores:
                bars.append((f"{name} {setup}", scores))
            setup_metrics = Path(part.get("metrics_file") or "/nonexistent")
            if setup != "base" and setup_metrics.is_file():
                rounds, losses, low, high = heldout_curve(setup_metrics)
                if rounds:
                    line = heldout_ax.plot(rounds, losses, marker="o", label=f"{name} {setup}")
                    heldout_ax.fill_between(rounds, low, high, alpha=0.12,
                                            color=line[0].get_color())
    panels = ((loss_ax, "Train loss per round (federated)", "loss",
               "no training metrics (training failed or was skipped)"),
              (heldout_ax, "Held-out loss (round 0 = base; band: 95 % CI)", "mean token loss",
               "no held-out rows scored: set static.dataset.validation-size"),
              (comm_ax, "Cumulative communication", "MB (2^20 bytes)",
               "no training metrics (training failed or was skipped)"))
    for ax, title, ylabel, why in panels:
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.set(xlabel="round", ylabel=ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            ax.grid(alpha=0.3)
        else:
            _empty(ax, why)
    _score_bars(score_ax, bars)
    fig.tight_layout()
    atomic_write_figure(target, fig)
    plt.close(fig)


def _score_bars(ax, bars: list[tuple[str, dict]]) -> None:
    """Each setup's mean score per protocol, side by side (hatched: robust)."""
    ax.set_title("Mean score per protocol (%)")
    if not bars:
        _empty(ax, "no evaluation results")
        return
    protocols = [p for p in PROTOCOL_TITLES if any(p in scores for _, scores in bars)]
    width = 0.8 / len(bars)
    for i, (label, scores) in enumerate(bars):
        values = [scores.get(p, {}).get("mean") or 0.0 for p in protocols]
        xs = [k + i * width for k in range(len(protocols))]
        ax.bar(xs, values, width, label=label)
        for x, value in zip(xs, values, strict=True):
            ax.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(protocols))],
                  [PROTOCOL_TITLES[p] for p in protocols])
    ax.set_ylabel("%")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")


def write_results(sweep_dir: Path, states: list[dict]) -> list[dict]:
    """results.{csv,json,md} of every pair, and results-<task>.png per task (results.png: the
    first task's, for a one-task sweep the only one)."""
    rows = [row for state in states for row in result_rows(state)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "results.csv", buffer.getvalue())
    atomic_write_json(sweep_dir / "results.json", rows)
    atomic_write_text(sweep_dir / "results.md", markdown(rows))
    tasks = list(dict.fromkeys(state["task"] for state in states))
    for task in tasks:
        plot_task([s for s in states if s["task"] == task], task,
                  sweep_dir / f"results-{task}.png")
    if tasks:
        (sweep_dir / "results.png").unlink(missing_ok=True)
        (sweep_dir / "results.png").symlink_to(f"results-{tasks[0]}.png")
    return rows
