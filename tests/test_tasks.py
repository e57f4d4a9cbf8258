"""The task table: names, row formats, stand-ins (flowertune_nlp/tasks.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import SHARED_DATA

from flowertune_nlp.data import format_prompt, tokenize_partition
from flowertune_nlp.tasks import (
    TASKS,
    UnknownTask,
    canonical_name,
    get_task,
    parse_task_list,
    stand_in_path,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_four_challenges_and_the_baselines_spelling():
    assert list(TASKS) == ["general_nlp", "finance", "medical", "code"]
    assert canonical_name("general-nlp") == "general_nlp"
    assert parse_task_list("all") == list(TASKS)
    assert parse_task_list("code, finance,code") == ["code", "finance"]
    with pytest.raises(UnknownTask, match="unknown task 'legal'; known tasks: general_nlp, "
                                          "finance, medical, code"):
        parse_task_list("finance,legal")


ROW = {"instruction": "What is the sentiment of this news?", "input": "Shares rose 5 %.",
       "output": "positive"}


def test_finance_and_code_join_instruction_and_input_with_one_space():
    for task in ("finance", "code"):
        instruction, context, output = get_task(task).training_row(ROW, True)
        assert instruction == "What is the sentiment of this news? Shares rose 5 %."
        assert (context, output) == (None, "positive")
    # an empty input leaves the instruction alone (the leaderboard's trailing space is stripped)
    assert get_task("code").training_row({**ROW, "input": ""}, True)[0] == ROW["instruction"]


def test_medical_asks_the_question_and_drops_the_constant_instruction():
    row = {"instruction": "Answer this question truthfully", "input": "What causes gout?",
           "output": "Uric acid crystals."}
    assert get_task("medical").training_row(row, True) == (
        "What causes gout?", None, "Uric acid crystals.")


def test_general_nlp_keeps_the_input_when_asked():
    assert get_task("general_nlp").training_row(ROW, True)[1] == "Shares rose 5 %."
    assert get_task("general_nlp").training_row(ROW, False)[1] is None


def test_the_task_decides_what_the_model_is_trained_on(tiny_model_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {"instruction": "Answer this question truthfully", "input": "What causes gout?",
           "output": "Uric acid crystals."}
    rows = Dataset.from_list([row])
    medical = tokenize_partition(rows, tokenizer, 256, True, task="medical").dataset[0]
    general = tokenize_partition(rows, tokenizer, 256, True).dataset[0]
    prompt_ids = tokenizer(format_prompt("What causes gout?", None, True))["input_ids"]
    assert medical["input_ids"][:len(prompt_ids)] == prompt_ids
    assert general["input_ids"] != medical["input_ids"]


@pytest.mark.shared_data
def test_offline_stand_ins_exist_for_every_task(tmp_path):
    for task in TASKS.values():
        path = stand_in_path(task, SHARED_DATA, tmp_path)
        assert path.is_file(), task.name
        first = json.loads(path.read_text().splitlines()[0]) if path.suffix == ".jsonl" else (
            json.loads(path.read_text())[0])
        assert {"instruction", "output"} <= set(first), task.name
    assert (tmp_path / "finance-stand-in.jsonl").is_file()  # built from the sources


def test_a_missing_stand_in_names_the_file_and_the_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="code_alpaca_2k.json is missing.*"
                                                "flwrlabs/code-alpaca-20k"):
        stand_in_path(get_task("code"), tmp_path, tmp_path)


@pytest.mark.shared_data
def test_the_cli_lists_tasks_and_refuses_unknown_ones():
    run = [sys.executable, "-m", "flowertune_nlp.tasks"]
    listed = subprocess.run([*run, "list"], capture_output=True, text=True, cwd=ROOT)
    assert listed.returncode == 0 and "flwrlabs/fingpt-sentiment-train" in listed.stdout
    bad = subprocess.run([*run, "stand-in", "legal", "--data-dir", str(SHARED_DATA)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown task 'legal'" in bad.stderr
