"""What a user sees when a command is given something wrong: one line naming the fix, exit 2, no
traceback, and the closest known names for a typo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import SHARED_DATA

from flowertune_nlp.config import ConfigError, build_config

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=OFFLINE, timeout=300)


def test_an_unknown_run_config_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown run config key 'strategy.nme'; did you mean "
                                          "'strategy.name'"):
        build_config({"strategy.nme": "fedavg"})


def test_an_unknown_flag_suggests_the_closest():
    result = run("-m", "evaluation", "--tsk", "code")
    assert result.returncode == 2
    assert "--tsk: did you mean --task" in result.stderr


def test_offline_mmlu_without_a_local_copy_is_one_line_naming_the_flag(tiny_model_dir):
    result = run("-m", "evaluation", "--base-model-name-path", str(tiny_model_dir),
                 "--limit", "1", "--no-progress")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--mmlu-path" in errors[0] and "--data-dir" in errors[0]


@pytest.mark.parametrize(("args", "message"), [
    (("--task", "legal"), "unknown task 'legal'; known tasks: general_nlp, finance, medical, "
                          "code"),
    (("--task", "finance", "--benchmarks", "fpb,sst2"),
     "unknown benchmark(s) sst2 for task finance; known: fpb, fiqa, tfns"),
    (("--task", "finance", "--protocol", "exact"), "unknown protocol ['exact']"),
    (("--task", "medical", "--data-dir", "/no/such/dir"), "/no/such/dir"),
])
def test_bad_evaluation_requests_exit_2_before_loading_a_model(args, message, tmp_path):
    output = tmp_path / "out.json"
    result = run("-m", "evaluation", "--base-model-name-path", "/no/model/needed",
                 "--output", str(output), "--no-progress", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists()


@pytest.mark.shared_data
def test_check_references_needs_the_code_task():
    result = run("-m", "evaluation", "--task", "finance", "--check-references",
                 "--data-dir", str(SHARED_DATA))
    assert result.returncode == 2
    assert "--check-references is for --task code" in result.stderr
