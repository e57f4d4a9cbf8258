"""The four FlowerTune challenges, each defined once: training data (hub id online, a stand-in
offline), how a row becomes a training example, the federation shape the leaderboard fixes, the
evaluation suite, and the presets' evaluation sizes.

Everything that differs between tasks reads this table: the run config's `task` key (and the
task defaults it fills in), data.py's row formatting, the sweep, the evaluation CLI. No torch
import here: config validation and the sweep read it before any model loads.

Where we deviate from the leaderboard's training recipe, and why:
- general NLP keeps alpaca's `input` (`static.dataset.keep-input-field`): the leaderboard drops
  it, which trains 40 % of the rows on an instruction whose subject is missing;
- every task trains with the Alpaca prompt *with* the blank lines of the original Alpaca
  template and an EOS after the response (`train.train-eos`); the leaderboard's template has no
  blank lines and trains no EOS (its pad token is its EOS). Set `train.train-eos = false` for the
  leaderboard's EOS rule.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flowertune_nlp.cli import ArgumentParser

# (instruction, input or None, output) of one training row.
TrainingRow = tuple[str, str | None, str]


def _alpaca_row(row: Mapping, keep_input: bool) -> TrainingRow:
    """general NLP: alpaca's instruction, input (when kept) and output."""
    return (str(row.get("instruction") or ""), row.get("input") if keep_input else None,
            str(row.get("output") or ""))


def _instruction_plus_input(row: Mapping, keep_input: bool) -> TrainingRow:
    """finance and code, as the leaderboard's `reformat`: instruction + " " + input in one
    instruction (the sentence to classify, the code to fix), no separate input."""
    instruction = f"{row.get('instruction') or ''} {row.get('input') or ''}"
    return instruction.strip(), None, str(row.get("output") or "")


def _question_as_instruction(row: Mapping, keep_input: bool) -> TrainingRow:
    """medical, as the leaderboard's `reformat`: the constant instruction ("Answer this question
    truthfully") is dropped and the question (alpaca's `input`) becomes the instruction."""
    return str(row.get("input") or ""), None, str(row.get("output") or "")


@dataclass(frozen=True)
class StandIn:
    """The offline training data under --data-dir: a file there, or one built from files there
    (`build`: data dir -> rows), and the sentence every result that uses it must carry."""

    path: str | None
    note: str
    build: str | None = None  # "module:function" returning a list of alpaca rows


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    dataset: str  # training set, hub id (online)
    stand_in: StandIn
    training_row: Callable[[Mapping, bool], TrainingRow]
    num_partitions: int  # the leaderboard's fixed federation shape
    fraction_train: float
    suite: str  # module with the evaluation suite (evaluation/suite.py's interface)
    protocol_names: Mapping[str, str] = field(default_factory=dict)  # suite's own names
    # per preset: items scored per benchmark (MMLU: per subject); absent = all
    eval_limits: Mapping[str, int] = field(default_factory=dict)


TASKS: dict[str, Task] = {
    "general_nlp": Task(
        name="general_nlp", title="General NLP", dataset="vicgalle/alpaca-gpt4",
        stand_in=StandIn("alpaca-gpt4/alpaca_en_demo.json",
                         "LLaMA-Factory's sample of alpaca-gpt4 (the full set is 52,002 rows)"),
        training_row=_alpaca_row, num_partitions=20, fraction_train=0.1,
        suite="evaluation.mmlu", protocol_names={"leaderboard": "flowertune",
                                                 "robust": "logprob"},
        eval_limits={"cpu-smoke": 5}),
    "finance": Task(
        name="finance", title="Finance", dataset="flwrlabs/fingpt-sentiment-train",
        stand_in=StandIn(None, "stand-in for fingpt-sentiment-train: the FPB and FiQA rows not "
                         "in the evaluation splits, with FinGPT's instructions (no TFNS, no "
                         "NWGI)", build="flowertune_nlp.finance_sources:build_finance_standin"),
        training_row=_instruction_plus_input, num_partitions=50, fraction_train=0.1,
        suite="evaluation.finance", eval_limits={"cpu-smoke": 20}),
    "medical": Task(
        name="medical", title="Medical", dataset="flwrlabs/medical-meadow-medical-flashcards",
        stand_in=StandIn(
            "medical/medical-meadow-wikidoc-patient-information-fallback/"
            "medical_meadow_small.json",
            "stand-in for medical-meadow flashcards: Medical Meadow WikiDoc patient "
            "information (5,942 rows, longer answers)"),
        training_row=_question_as_instruction, num_partitions=20, fraction_train=0.1,
        suite="evaluation.medical", eval_limits={"cpu-smoke": 20}),
    "code": Task(
        name="code", title="Code", dataset="flwrlabs/code-alpaca-20k",
        stand_in=StandIn("code/code-alpaca-2k-fallback/code_alpaca_2k.json",
                         "stand-in for code-alpaca-20k: rows of the 2k Code Alpaca release "
                         "(not a subset of the 20k)"),
        training_row=_instruction_plus_input, num_partitions=10, fraction_train=0.2,
        suite="evaluation.code.suite", eval_limits={"cpu-smoke": 2}),
}
ALIASES = {"general-nlp": "general_nlp", "generalnlp": "general_nlp"}
DEFAULT_TASK = "general_nlp"


class UnknownTask(ValueError):
    """A task name that is not one of TASKS (or their aliases)."""


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def canonical_name(name: str) -> str:
    """`general-nlp` (the baseline's spelling) -> `general_nlp`; unknown names raise, naming the
    known ones."""
    key = ALIASES.get(name.strip(), name.strip())
    if key not in TASKS:
        raise UnknownTask(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                          "(general-nlp is accepted for general_nlp)")
    return key


def get_task(name: str) -> Task:
    return TASKS[canonical_name(name)]


def parse_task_list(spec: str) -> list[str]:
    """`finance,code` or `all` -> canonical task names, in the table's order for `all` and as
    given otherwise (duplicates dropped)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if parts == ["all"]:
        return list(TASKS)
    if not parts:
        raise UnknownTask(f"no task given; known tasks: {', '.join(TASKS)}, all")
    return list(dict.fromkeys(canonical_name(p) for p in parts))


def stand_in_path(task: Task, data_dir: Path, cache_dir: Path) -> Path:
    """The offline training file of `task` under `data_dir`; a built stand-in (finance) is
    built from `data_dir` into `cache_dir` (atomically) on every call, so it never lags behind
    its sources (it takes a second). FileNotFoundError names the file and the hub id to use
    online."""
    if task.stand_in.path is not None:
        path = data_dir / task.stand_in.path
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the offline stand-in of task {task.name!r}; lay out "
                f"--data-dir like ../shared/data, or train online from {task.dataset}")
        return path
    import importlib
    import json

    from flowertune_nlp.io import atomic_write_text

    target = cache_dir / f"{task.name}-stand-in.jsonl"
    module, function = task.stand_in.build.split(":")
    rows = getattr(importlib.import_module(module), function)(data_dir)
    atomic_write_text(target, "".join(json.dumps(r) + "\n" for r in rows))
    return target


def main(argv: list[str] | None = None) -> int:
    """`python -m flowertune_nlp.tasks`: list the tasks, or print a task's offline training
    file (building the finance stand-in) for `--run-config static.dataset.name=...`."""
    parser = ArgumentParser(prog="python -m flowertune_nlp.tasks",
                                     description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the tasks and what defines them")
    stand_in = sub.add_parser("stand-in", help="print the offline training file of a task")
    stand_in.add_argument("task")
    stand_in.add_argument("--data-dir", required=True,
                          help="offline data laid out like ../shared/data")
    stand_in.add_argument("--cache-dir", default=".cache/stand-ins",
                          help="where a built stand-in (finance) is written")
    args = parser.parse_args(argv)
    if args.command == "list":
        for task in TASKS.values():
            print(f"{task.name:<12} train {task.dataset} ({task.num_partitions} partitions, "
                  f"fraction {task.fraction_train}); offline: {task.stand_in.note}; "
                  f"evaluation: {task.suite}")
        return 0
    try:
        task = get_task(args.task)
        print(stand_in_path(task, Path(args.data_dir).expanduser().resolve(),
                            Path(args.cache_dir).expanduser().resolve()))
    except (UnknownTask, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
