"""data/samples/: the small, licensed subsets a fresh clone runs on. They must be exactly what
scripts/make_samples.py cuts from ../shared/data, stay small, list every file with its licence
and SHA-256, and be read by every loader as the full copies are."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import REPO_SAMPLES, SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_samples.py"
_spec = importlib.util.spec_from_file_location("make_samples", SCRIPT)
make_samples = sys.modules["make_samples"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_samples)

ROW = re.compile(r"^\| `([^`]+)` \| [^|]+ \| [^|]+ \| ([^|]+) \| `([0-9a-f]{64})` \|$")
EVAL_SETS = {  # loader module -> the sets the samples hold
    "evaluation.finance": ("fpb", "tfns"),
    "evaluation.medical": ("pubmedqa", "medqa", "medmcqa"),
    "evaluation.code.suite": ("humaneval", "mbpp", "multiple-js", "multiple-cpp"),
}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _loader(module: str):
    return importlib.import_module(module)


@pytest.mark.shared_data
def test_samples_are_exactly_what_make_samples_cuts_from_the_shared_data():
    built, committed = make_samples.build(SHARED_DATA), _files(REPO_SAMPLES)
    assert sorted(committed) == sorted(built)
    stale = [path for path in built if built[path] != committed[path]]
    assert not stale, f"{stale[:5]} differ: run scripts/make_samples.py ../shared/data"


def test_samples_stay_small():
    assert sum(len(data) for data in _files(REPO_SAMPLES).values()) < make_samples.SIZE_LIMIT


def test_readme_lists_every_file_with_its_licence_and_sha256():
    files = _files(REPO_SAMPLES)
    rows = [ROW.match(line) for line in files.pop("README.md").decode().splitlines()]
    listed = {m[1]: (m[2].strip(), m[3]) for m in rows if m}
    sums = files.pop("SHA256SUMS").decode()
    actual = {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}
    assert {path: sha for path, (_, sha) in listed.items()} == actual
    assert sums == "".join(f"{actual[s.path]}  ./{s.path}\n" for s in make_samples.SAMPLES)
    non_commercial = {path for path, (licence, _) in listed.items() if "-NC" in licence}
    assert non_commercial == {path for path, (licence, _) in listed.items()
                              if licence.endswith("**NC**")}
    assert non_commercial == {"alpaca-gpt4/alpaca_en_demo.json",
                              "finance/fpb/Sentences_50Agree.txt",
                              "code/code-alpaca-2k-fallback/code_alpaca_2k.json"}
    assert all(licence.split()[0] in ("MIT", "CC") for licence, _ in listed.values())


def test_mmlu_loader_reads_all_57_subjects():
    from evaluation.mmlu import ALL_SUBJECTS, CATEGORIES, load_questions, load_subject

    mmlu = str(REPO_SAMPLES / "mmlu")
    questions = load_questions(mmlu, tuple(CATEGORIES))
    assert len(questions) == 57 * make_samples.MMLU_TEST_ROWS
    assert {q.subject for q in questions} == set(ALL_SUBJECTS)
    assert all(len(load_subject(mmlu, s, "dev")) == 5 for s in ALL_SUBJECTS)


@pytest.mark.parametrize(("module", "name"),
                         [(m, n) for m, names in EVAL_SETS.items() for n in names])
def test_each_evaluation_set_loads(module, name):
    items = _loader(module).load_items(name, str(REPO_SAMPLES), None)
    # FPB is whole: the leaderboard's 25 % split of all 4,846 sentences.
    assert len(items) == (1212 if name == "fpb" else make_samples.EVAL_ITEMS)
    assert len({i.qid for i in items}) == len(items) and all(i.gold for i in items)


@pytest.mark.shared_data
@pytest.mark.parametrize(("module", "name"),
                         [(m, n) for m, names in EVAL_SETS.items() for n in names])
def test_each_evaluation_set_is_the_start_of_the_full_one(module, name):
    loader = _loader(module)
    sample = loader.load_items(name, str(REPO_SAMPLES), None)
    assert sample == loader.load_items(name, str(SHARED_DATA), len(sample))


@pytest.mark.parametrize("task", ["general_nlp", "code"])
def test_training_stand_ins_are_in_the_samples(task, tmp_path):
    from flowertune_nlp.tasks import get_task, stand_in_path

    path = stand_in_path(get_task(task), REPO_SAMPLES, tmp_path)
    rows = json.loads(path.read_text())
    assert path.is_relative_to(REPO_SAMPLES) and len(rows) == make_samples.TRAINING_ROWS
    assert all(set(r) == {"instruction", "input", "output"} and r["instruction"] for r in rows)


def test_make_samples_rejects_an_incomplete_source_and_writes_nothing(tmp_path):
    (tmp_path / "source").mkdir()
    out = tmp_path / "samples"
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "source"), "--out",
                           str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and not out.exists() and not list(tmp_path.glob(".samples*"))
    assert done.stderr.count("\n") == 1
    assert "alpaca-gpt4/alpaca_en_demo.json is missing" in done.stderr
