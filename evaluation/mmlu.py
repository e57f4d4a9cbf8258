"""MMLU questions: subjects, the leaderboard's categories, and loading from a folder or the hub."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

LETTERS = "ABCD"

CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics",
        "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
        "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
        "world_religions",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
        "human_aging", "management", "marketing", "medical_genetics", "miscellaneous",
        "nutrition", "professional_accounting", "professional_medicine", "virology",
    ),
}
LEADERBOARD_CATEGORIES = ("stem", "social_sciences", "humanities")
# What tables and plots call each category.
CATEGORY_TITLES = {"stem": "STEM", "social_sciences": "Social Sciences", "humanities": "Humanities",
                   "other": "Other"}
ALL_SUBJECTS = tuple(sorted(s for subjects in CATEGORIES.values() for s in subjects))
SUBJECT_CATEGORY = {s: c for c, subjects in CATEGORIES.items() for s in subjects}
HUB_DATASET = "cais/mmlu"


@dataclass(frozen=True)
class Question:
    subject: str
    index: int  # position within the subject's split, for stable ids
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3

    @property
    def gold_letter(self) -> str:
        return LETTERS[self.answer]

    @property
    def category(self) -> str:
        return SUBJECT_CATEGORY[self.subject]

    @property
    def qid(self) -> str:
        return f"{self.subject}/{self.index}"


def parse_categories(spec: str) -> tuple[str, ...]:
    """'stem,humanities' / 'all' -> category names; unknown names are an error listing the valid."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if names == ["all"]:
        return tuple(CATEGORIES)
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown or not names:
        raise ValueError(
            f"unknown MMLU category {unknown or spec!r}; valid: {', '.join(CATEGORIES)}, all"
        )
    return tuple(dict.fromkeys(names))


def _answer_index(raw: str, where: str) -> int:
    value = raw.strip()
    if value in LETTERS:
        return LETTERS.index(value)
    if value in ("0", "1", "2", "3"):
        return int(value)
    raise ValueError(f"{where}: answer {raw!r} is neither A-D nor 0-3")


def _read_csv(path: Path, subject: str) -> list[Question]:
    """Both layouts: header `question,choice0..3,answer` with 0-based answers (cais/mmlu), or
    the raw hendrycks release (no header, letter answers)."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if rows and rows[0][:1] == ["question"]:
        rows = rows[1:]
    questions = []
    for i, row in enumerate(rows):
        if len(row) != 6:
            raise ValueError(f"{path} row {i + 1}: expected 6 fields, found {len(row)}")
        questions.append(Question(subject, i, row[0], tuple(row[1:5]),
                                  _answer_index(row[5], f"{path} row {i + 1}")))
    return questions


def _split_dir(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"MMLU folder {root} has no '{split}/' subfolder; expected {root}/{split}/"
            f"<subject>_{split}.csv files"
        )
    return folder


def check_local_layout(root: Path, split: str = "test") -> None:
    """All 57 subjects must be there: a missing one would silently skew category scores."""
    folder = _split_dir(root, split)
    present = {p.name.removesuffix(f"_{split}.csv") for p in folder.glob(f"*_{split}.csv")}
    missing = sorted(set(ALL_SUBJECTS) - present)
    if missing:
        raise FileNotFoundError(
            f"MMLU folder {folder} lacks {len(missing)} of 57 subjects, e.g. {missing[:3]}"
        )


def load_subject(source: str, subject: str, split: str = "test") -> list[Question]:
    """A subject's questions from a local folder (`<source>/<split>/<subject>_<split>.csv`) or
    from the hub dataset `cais/mmlu`."""
    root = Path(source).expanduser()
    if root.exists():
        return _read_csv(_split_dir(root, split) / f"{subject}_{split}.csv", subject)
    from datasets import load_dataset

    rows = load_dataset(source, subject, split=split)
    return [Question(subject, i, r["question"], tuple(r["choices"]), int(r["answer"]))
            for i, r in enumerate(rows)]


def load_questions(source: str, categories: tuple[str, ...], limit_per_subject: int | None = None,
                   split: str = "test") -> list[Question]:
    """Questions of the given categories; `limit_per_subject` keeps the first N of each subject
    (deterministic, so base and fine-tuned models see the same subset)."""
    if Path(source).expanduser().exists():
        check_local_layout(Path(source).expanduser(), split)
    questions: list[Question] = []
    for category in categories:
        for subject in CATEGORIES[category]:
            rows = load_subject(source, subject, split)
            questions += rows[:limit_per_subject] if limit_per_subject else rows
    return questions
