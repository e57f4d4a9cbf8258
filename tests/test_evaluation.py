import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation.__main__ import main as cli_main
from evaluation.mmlu import CATEGORIES, Question, load_questions, load_subject, parse_categories
from evaluation.protocols import (
    flowertune_prompt,
    logprob_prompt,
    parse_flowertune,
    run_flowertune,
    run_logprob,
)
from evaluation.reference import reference_flowertune, reference_logprob
from evaluation.runner import AdapterError, EvalRequest, evaluate
from flowertune_nlp.config import LoraSettings
from flowertune_nlp.models import lora_config

Q = Question("high_school_geography", 0, "What is the capital of France",
             ("Paris", "Rome", "Berlin", "Madrid"), 0)


def test_flowertune_prompt_matches_the_leaderboard_string():
    assert flowertune_prompt(Q) == (
        "<|im_start|>question\n"
        "Answer the following multiple choice question.\n"
        "Question: What is the capital of France?\n\n"
        "Options:\nA. Paris\nB. Rome\nC. Berlin\nD. Madrid\n"
        "The answer is:\n<|im_end|>\n<|im_start|>answer\n"
    )
    ended = Question("x", 0, "Pick one.", ("a", "b", "c", "d"), 1)
    assert "Question: Pick one.\n" in flowertune_prompt(ended)


def test_logprob_prompt_matches_lm_evaluation_harness():
    assert logprob_prompt(Q) == (
        "The following are multiple choice questions (with answers) about high school "
        "geography.\n\nWhat is the capital of France\nA. Paris\nB. Rome\nC. Berlin\n"
        "D. Madrid\nAnswer:"
    )
    shot = Question("high_school_geography", 1, "Largest ocean?",
                    ("Pacific", "Atlantic", "Indian", "Arctic"), 0)
    assert logprob_prompt(Q, [shot]).split("\n\n")[1] == (
        "Largest ocean?\nA. Pacific\nB. Atlantic\nC. Indian\nD. Arctic\nAnswer: A"
    )


@pytest.mark.parametrize(("output", "gold", "letter", "correct"), [
    ("A", "A", "A", True),
    (" b", "B", "B", True),
    ("Answer: C", "C", "A", False),  # the leaderboard reads the first character
    ("Answer: C", "A", "A", True),
    ("The answer", "C", None, False),
    ("<think>", "A", None, False),
    ("", "A", None, False),
    ("\n## D\n", "D", "D", True),
    ("e", "A", None, False),
])
def test_flowertune_parser(output, gold, letter, correct):
    assert parse_flowertune(output, gold) == (letter, correct)


def test_category_and_question_counts(mmlu_dir):
    counts = {c: len(s) for c, s in CATEGORIES.items()}
    assert (counts["stem"], counts["social_sciences"], counts["humanities"]) == (19, 12, 13)
    assert sum(counts.values()) == 57
    for category, expected in (("stem", 3153), ("social_sciences", 3077), ("humanities", 4705)):
        assert len(load_questions(str(mmlu_dir), (category,))) == expected


def test_raw_hendrycks_layout_reads_the_same(mmlu_dir, tmp_path):
    (tmp_path / "test").mkdir()
    src = mmlu_dir / "test" / "anatomy_test.csv"
    import csv

    rows = list(csv.reader(src.open()))[1:]
    with (tmp_path / "test" / "anatomy_test.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([*r[:5], "ABCD"[int(r[5])]] for r in rows)
    assert load_subject(str(tmp_path), "anatomy") == load_subject(str(mmlu_dir), "anatomy")


def test_unknown_category_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: stem, social_sciences, humanities, other"):
        parse_categories("stem,science")


def test_incomplete_mmlu_folder_is_rejected(mmlu_dir, tmp_path):
    shutil.copytree(mmlu_dir / "test", tmp_path / "test")
    (tmp_path / "test" / "anatomy_test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 of 57 subjects"):
        load_questions(str(tmp_path), ("stem",))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_batched_predictions_equal_one_at_a_time(tiny, mmlu_dir):
    """Batched, length-sorted, last-position-only scoring predicts exactly what `generate` per
    question and one forward pass per answer choice predict."""
    model, tokenizer = tiny
    questions = load_questions(str(mmlu_dir), ("stem",), limit_per_subject=1)[:12]
    for run, reference in ((run_flowertune, reference_flowertune),
                           (run_logprob, reference_logprob)):
        expected = [(p.prediction, p.raw_output) for p in reference(model, tokenizer, questions)]
        for batch_size in (1, 6):
            got = run(model, tokenizer, questions, batch_size=batch_size)
            assert [(p.prediction, p.raw_output) for p in got] == expected


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = lora_config(LoraSettings(r=4, alpha=8))
    config.base_model_name_or_path = str(tiny_model_dir)
    peft = get_peft_model(model, config)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    path = tmp_path_factory.mktemp("adapter") / "peft_1"
    peft.save_pretrained(path)
    return path


def _request(base, mmlu_dir, tmp_path, **kwargs) -> EvalRequest:
    return EvalRequest(base_model=str(base), mmlu_path=str(mmlu_dir), categories=("stem",),
                       limit_per_subject=1, batch_size=8, precision="fp32", progress=False,
                       output=str(tmp_path / "result.json"), **kwargs)


def test_adapter_changes_scores_and_result_files_agree(tiny_model_dir, tiny_adapter, mmlu_dir,
                                                       tmp_path):
    result = evaluate(_request(tiny_model_dir, mmlu_dir, tmp_path, peft_path=str(tiny_adapter)))
    assert result["scored"] == "adapter"
    rows = [json.loads(x) for x in Path(result["predictions_file"]).read_text().splitlines()]
    for protocol, summary in result["protocols"].items():
        mine = [r for r in rows if r["protocol"] == protocol]
        assert len(mine) == summary["questions"] == 19
        assert summary["overall"]["correct"] == sum(r["correct"] for r in mine)
        assert 0 <= summary["categories"]["stem"]["accuracy"] <= 1
    assert json.loads((tmp_path / "result.json").read_text())["protocols"].keys() == {
        "flowertune", "logprob"}


def test_missing_adapter_is_an_error_not_a_base_evaluation(tiny_model_dir, mmlu_dir, tmp_path):
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        evaluate(_request(tiny_model_dir, mmlu_dir, tmp_path, peft_path=str(tmp_path / "nope")))
    assert not (tmp_path / "result.json").exists()


def test_corrupt_adapter_is_an_error(tiny_model_dir, tiny_adapter, mmlu_dir, tmp_path):
    broken = tmp_path / "peft_broken"
    shutil.copytree(tiny_adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="failed to load"):
        evaluate(_request(tiny_model_dir, mmlu_dir, tmp_path, peft_path=str(broken)))


def test_adapter_of_another_base_model_is_an_error(tiny_adapter, tmp_path, mmlu_dir):
    from tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other-base", hidden=64)
    with pytest.raises(AdapterError, match="was trained on base model"):
        evaluate(_request(other, mmlu_dir, tmp_path, peft_path=str(tiny_adapter)))
    with pytest.raises(AdapterError, match="failed to load|does not fit"):
        evaluate(_request(other, mmlu_dir, tmp_path, peft_path=str(tiny_adapter),
                          allow_base_mismatch=True))


def test_cli_exits_non_zero_on_a_bad_adapter(tiny_model_dir, mmlu_dir, tmp_path, capsys):
    code = cli_main(["--base-model-name-path", str(tiny_model_dir), "--peft-path",
                     str(tmp_path / "missing"), "--mmlu-path", str(mmlu_dir),
                     "--limit-per-subject", "1", "--output", str(tmp_path / "r.json")])
    assert code == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
