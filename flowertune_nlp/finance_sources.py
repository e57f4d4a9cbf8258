"""The finance challenge's data read from offline copies (../shared/data/finance, README §4):
the three evaluation sets exactly as the FlowerTune leaderboard scores them, and a stand-in for
the training set `FinGPT/fingpt-sentiment-train`, which has no offline copy. No torch import:
the stand-in is built before any model loads.

Evaluation sets (the leaderboard's `load_data`):
- FPB: `takala/financial_phrasebank` / sentences_50agree, 25 % split with seed 42 (1,212 rows);
- FiQA: `pauri32/fiqa-2018` train+validation+test, the same split (304 rows). Those CSVs have no
  offline copy and their own row order, so the split cannot be recomputed from the raw FiQA
  files; the 304 rows come from a published FlowerTune results file (`generation_fiqa_fl.jsonl`,
  its `context` and `new_target`; its `new_out` is one model's answer and is ignored);
- TFNS: `zeroshot/twitter-financial-news-sentiment` / validation, whole (2,388 rows).
"""

from __future__ import annotations

import csv
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

LABELS = ("negative", "neutral", "positive")
# FinGPT's instructions (the leaderboard's evaluation and fingpt-sentiment-train alike).
NEWS_INSTRUCTION = ("What is the sentiment of this news? Please choose an answer from "
                    "{negative/neutral/positive}.")
TWEET_INSTRUCTION = ("What is the sentiment of this tweet? Please choose an answer from "
                     "{negative/neutral/positive}.")

FPB_FILE = "finance/fpb/Sentences_50Agree.txt"
TFNS_FILE = "finance/tfns/sent_valid.csv"
FIQA_REFERENCE_FILE = "finance/fiqa-2018/flowertune-eval-reference/generation_fiqa_fl.jsonl"
# The raw FiQA task-1 files, in the stand-in's order; headlines are news, posts are tweets.
FIQA_FILES = {
    "finance/fiqa-2018/task1_headline_ABSA_train.json": NEWS_INSTRUCTION,
    "finance/fiqa-2018/task1_headline_ABSA_test.json": NEWS_INSTRUCTION,
    "finance/fiqa-2018/task1_post_ABSA_train.json": TWEET_INSTRUCTION,
    "finance/fiqa-2018/task1_post_ABSA_test.json": TWEET_INSTRUCTION,
}
FPB_HUB = "takala/financial_phrasebank (config sentences_50agree, split train)"
FIQA_HUB = "pauri32/fiqa-2018 (train + validation + test)"
TFNS_HUB = "zeroshot/twitter-financial-news-sentiment (split validation)"
TRAINING_HUB = "flwrlabs/fingpt-sentiment-train"

EVAL_SHARE = 0.25  # datasets' train_test_split default test_size, which the leaderboard keeps
EVAL_SEED = 42
TFNS_LABELS = {"0": "negative", "1": "positive", "2": "neutral"}


@dataclass(frozen=True)
class Example:
    """One labelled text with the instruction the leaderboard (and FinGPT) pairs it with."""

    instruction: str
    text: str
    label: str  # one of LABELS


def eval_split(n: int) -> list[int]:
    """Indices of `datasets.Dataset.train_test_split(test_size=0.25, seed=42)["test"]` over n
    rows, in its order: the first ceil(0.25 n) of numpy's `default_rng(42).permutation(n)`."""
    import numpy as np

    return np.random.default_rng(EVAL_SEED).permutation(n)[:math.ceil(EVAL_SHARE * n)].tolist()


def fiqa_label(score: float) -> str:
    """The leaderboard's thresholds on FiQA's sentiment score in [-1, 1]."""
    if score < -0.1:
        return "negative"
    return "neutral" if score < 0.1 else "positive"


def _require(data_dir: Path, relative: str, hub: str) -> Path:
    path = Path(data_dir) / relative
    if not path.is_file():
        raise ValueError(f"{path} is missing: lay out the data folder like ../shared/data "
                         f"(finance/, README section 4), or load {hub} from the hub online")
    return path


def read_fpb(data_dir: Path) -> list[Example]:
    """All 4,846 FPB sentences in file order. The file is ISO-8859-1 with CRLF line ends, one
    `sentence@label` a line, split at the last "@" as the hub's loader does."""
    path = _require(data_dir, FPB_FILE, FPB_HUB)
    lines = path.read_bytes().decode("iso-8859-1").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    examples = []
    for number, line in enumerate(lines, start=1):
        sentence, _, label = line.rstrip("\r").rpartition("@")
        if not sentence or label not in LABELS:
            raise ValueError(f"{path} line {number}: expected 'sentence@label' with label "
                             f"{'/'.join(LABELS)}, got {line[:80]!r}")
        examples.append(Example(NEWS_INSTRUCTION, sentence, label))
    return examples


def fpb_eval(data_dir: Path) -> list[Example]:
    """The leaderboard's 1,212 FPB rows, in its order."""
    examples = read_fpb(data_dir)
    return [examples[i] for i in eval_split(len(examples))]


def read_tfns(data_dir: Path) -> list[Example]:
    """TFNS validation (2,388 tweets, file order); labels 0/1/2 = negative/positive/neutral."""
    path = _require(data_dir, TFNS_FILE, TFNS_HUB)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != ["text", "label"]:
            raise ValueError(f"{path} line 1: expected the header 'text,label', got {header}")
        examples = []
        for row in reader:
            if len(row) != 2 or row[1] not in TFNS_LABELS:
                raise ValueError(f"{path} line {reader.line_num}: expected text and a label "
                                 f"0/1/2, got {row}")
            examples.append(Example(TWEET_INSTRUCTION, row[0], TFNS_LABELS[row[1]]))
    return examples


def read_fiqa_reference(data_dir: Path) -> list[Example]:
    """The leaderboard's 304 FiQA rows, in its order, from the prompt (`context`) and gold
    (`new_target`) of a published results file. Texts are kept byte for byte, mojibake
    included: that is what the leaderboard's model reads."""
    path = _require(data_dir, FIQA_REFERENCE_FILE, FIQA_HUB)
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            context, gold = row["context"], row["new_target"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} line {number}: expected JSON with 'context' and "
                             f"'new_target' ({err})") from None
        head, sep, text = context.partition("\nInput: ")
        instruction = head.removeprefix("Instruction: ")
        if (not sep or instruction not in (NEWS_INSTRUCTION, TWEET_INSTRUCTION)
                or not text.endswith("\nAnswer: ") or gold not in LABELS):
            raise ValueError(f"{path} line {number}: not a FlowerTune finance prompt "
                             "('Instruction: <FinGPT instruction>\\nInput: <text>\\nAnswer: ') "
                             f"with a gold label {'/'.join(LABELS)}")
        examples.append(Example(instruction, text.removesuffix("\nAnswer: "), gold))
    return examples


def read_fiqa_annotations(data_dir: Path) -> list[Example]:
    """Every raw FiQA task-1 annotation (1,173; a sentence with several targets has several),
    headlines then posts, in file order, labelled with the leaderboard's thresholds."""
    examples = []
    for relative, instruction in FIQA_FILES.items():
        path = _require(data_dir, relative, FIQA_HUB)
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        for number, (key, entry) in enumerate(entries.items(), start=1):
            try:
                scores = [float(info["sentiment_score"]) for info in entry["info"]]
                sentence = entry["sentence"]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path} entry {number} (id {key}): expected 'sentence' and "
                                 f"'info' items with a numeric 'sentiment_score' ({err!r})"
                                 ) from None
            examples += [Example(instruction, sentence, fiqa_label(s)) for s in scores]
    return examples


def _undo_mojibake(text: str) -> str:
    """UTF-8 read as Latin-1, once or more (`todayâ\\x80\\x99s`, `Ã\\x82Â£`), decoded back;
    text that is not such a misreading is returned unchanged."""
    while True:
        try:
            fixed = text.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return text
        if fixed == text:
            return text
        text = fixed


def normalize(text: str) -> str:
    """The key under which two copies of a sentence compare equal: mojibake undone, Unicode
    NFKC, whitespace collapsed, case folded."""
    text = unicodedata.normalize("NFKC", _undo_mojibake(text))
    return re.sub(r"\s+", " ", text).strip().casefold()


def build_finance_standin(data_dir: Path) -> list[dict]:
    """Instruction/input/output rows standing in for fingpt-sentiment-train, built as FinGPT
    built it but from what is offline: the FPB rows outside the leaderboard's 1,212-row split,
    then the FiQA annotations whose sentence is not among the leaderboard's 304 FiQA rows, with
    FinGPT's instructions (FiQA posts are tweets, headlines news); output = the label word.

    Differences from the real set (76,772 rows), on purpose or forced:
    - no TFNS rows: its only offline split is the validation set the leaderboard evaluates on
      (FinGPT trained on the train split, 9,543 tweets); no NWGI rows (no offline copy);
    - no repetition: FinGPT repeated FPB 6 times and FiQA 21 times (and TFNS twice);
    - FinGPT's FiQA training rows came from a different split (22.6 %) and so include about
      three quarters of the leaderboard's FiQA evaluation rows; here none are included;
    - any sentence equal (after `normalize`) to one of any of the three evaluation sets is
      dropped, which also removes the FPB duplicates of split sentences.
    Deterministic: file order, FPB first."""
    data_dir = Path(data_dir)
    fpb = read_fpb(data_dir)
    held_out = set(eval_split(len(fpb)))
    evaluated = {normalize(e.text) for e in (
        [fpb[i] for i in held_out] + read_fiqa_reference(data_dir) + read_tfns(data_dir))}
    candidates = [e for i, e in enumerate(fpb) if i not in held_out]
    candidates += read_fiqa_annotations(data_dir)
    return [{"instruction": e.instruction, "input": e.text, "output": e.label}
            for e in candidates if normalize(e.text) not in evaluated]
