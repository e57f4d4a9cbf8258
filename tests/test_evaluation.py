import gc
import json
import shutil
import weakref
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation import curve, runner
from evaluation.__main__ import main as cli_main
from evaluation.mmlu import CATEGORIES, Question, load_questions, load_subject, parse_categories
from evaluation.protocols import (
    _score_continuations,
    _score_next_token,
    continuation_scores,
    encode_logprob,
    flowertune_prompt,
    harness_encode_pair,
    logprob_prompt,
    parse_flowertune,
    run_flowertune,
    run_logprob,
)
from evaluation.reference import reference_flowertune, reference_logprob
from evaluation.runner import AdapterError, EvalRequest, evaluate
from flowertune_nlp.config import LoraSettings
from flowertune_nlp.models import Precision, lora_config

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


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_model_dir):
    """The tiny tokenizer set up as Gemma's is: it adds its BOS token to every encoding."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, add_bos_token=True)
    assert tokenizer.encode("Hello")[0] == tokenizer.bos_token_id
    return tokenizer


@pytest.mark.parametrize("with_bos", [False, True], ids=["no-bos", "bos"])
def test_batched_predictions_equal_one_at_a_time(tiny, bos_tokenizer, mmlu_dir, with_bos):
    """Batched, length-sorted, last-position-only scoring predicts exactly what `generate` per
    question and one forward pass per answer choice predict, and gives the same four
    log-likelihoods."""
    model, tokenizer = tiny
    if with_bos:
        tokenizer = bos_tokenizer
    questions = load_questions(str(mmlu_dir), ("stem",), limit_per_subject=1)[:12]
    for run, reference in ((run_flowertune, reference_flowertune),
                           (run_logprob, reference_logprob)):
        expected = reference(model, tokenizer, questions)
        for batch_size in (1, 6):
            got = run(model, tokenizer, questions, batch_size=batch_size)
            assert [(p.prediction, p.raw_output) for p in got] == [
                (p.prediction, p.raw_output) for p in expected]
            if run is run_logprob:
                assert torch.allclose(torch.tensor([p.loglikelihoods for p in got]),
                                      torch.tensor([p.loglikelihoods for p in expected]),
                                      atol=1e-4, rtol=0)


def test_logprob_prepends_bos_when_the_tokenizer_adds_it(tiny, bos_tokenizer):
    """lm-evaluation-harness encodes with the tokenizer's own special tokens: Gemma's prompts
    start with <bos>, SmolLM2's with none. The scores are those of the BOS-prefixed prompt."""
    model, plain = tiny
    bos = bos_tokenizer.bos_token_id
    (with_bos,), ((a, *_),) = encode_logprob(bos_tokenizer, [Q])
    (without,), _ = encode_logprob(plain, [Q])
    text_ids = plain.encode(logprob_prompt(Q), add_special_tokens=False)
    assert with_bos == [bos, *text_ids] and without == text_ids
    assert a == plain.encode(" A", add_special_tokens=False)
    # A prompt that already starts with the BOS string does not get a second one.
    context, _ = harness_encode_pair(bos_tokenizer, "<s>" + logprob_prompt(Q), " A")
    assert context == [bos, *text_ids]
    # Trailing spaces of the context move to the continuation, as in the harness.
    context, continuation = harness_encode_pair(plain, logprob_prompt(Q) + " ", "A")
    assert (context, continuation) == (text_ids, a)
    (prediction,) = run_logprob(model, bos_tokenizer, [Q], batch_size=1)
    expected = []
    for letter in "ABCD":
        continuation = plain.encode(f" {letter}", add_special_tokens=False)
        logits = model(input_ids=torch.tensor([with_bos + continuation])).logits[0]
        logprobs = torch.log_softmax(logits, -1)[len(with_bos) - 1:-1]
        expected.append(float(logprobs[range(len(continuation)), continuation].sum()))
    assert torch.allclose(torch.tensor(prediction.loglikelihoods), torch.tensor(expected),
                          atol=1e-5)
    (plain_prediction,) = run_logprob(model, plain, [Q], batch_size=1)
    assert plain_prediction.loglikelihoods != prediction.loglikelihoods


def test_multi_token_continuation_path_scores_like_the_next_token_path(tiny, mmlu_dir):
    """The general path (prompt + continuation, right-padded, per-question continuations)
    gives the one-token path's scores on one-token continuations (here: the first token of
    each " A".." D", which the tiny tokenizer splits)."""
    model, tokenizer = tiny
    questions = load_questions(str(mmlu_dir), ("stem",), limit_per_subject=1)[:6]
    prompts, continuations = encode_logprob(tokenizer, questions)
    first = [[c[0] for c in conts] for conts in continuations]
    one_token = _score_next_token(model, tokenizer, prompts, first, 4, "cpu", None)
    general = _score_continuations(model, tokenizer, prompts,
                                   [[[t] for t in row] for row in first], 4, "cpu", None)
    assert torch.allclose(one_token, general, atol=1e-4, rtol=0)


def test_continuation_scores_keep_no_autograd_graph(tiny, mmlu_dir):
    """Suites call this outside any inference mode, on models whose weights require gradients:
    a score that kept its graph would keep every batch's activations (24 GB on PubMedQA)."""
    model, tokenizer = tiny
    assert any(p.requires_grad for p in model.parameters())
    questions = load_questions(str(mmlu_dir), ("stem",), limit_per_subject=1)[:4]
    prompts, continuations = encode_logprob(tokenizer, questions)
    for conts in (continuations, [[c[:1] for c in row] for row in continuations]):
        scores = continuation_scores(model, tokenizer, prompts, conts, 4)
        assert not scores.requires_grad and scores.grad_fn is None


def test_multi_token_path_projects_only_the_continuation_positions(tiny, mmlu_dir):
    """The LM head sees the positions that predict continuation tokens, not every position of
    every prompt (PubMedQA's abstracts at batch 16 took over 20 GB of logits)."""
    model, tokenizer = tiny
    questions = load_questions(str(mmlu_dir), ("stem",), limit_per_subject=1)[:4]
    prompts, continuations = encode_logprob(tokenizer, questions)
    assert any(len(c) > 1 for conts in continuations for c in conts)
    widths = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: widths.append(out.shape[1]))
    try:
        _score_continuations(model, tokenizer, prompts, continuations, 4, "cpu", None)
    finally:
        hook.remove()
    longest = max(len(p) + len(c) for p, conts in zip(prompts, continuations, strict=True)
                  for c in conts)
    most = max(len(c) for conts in continuations for c in conts) * 4  # per batch of 4
    assert widths and max(widths) <= most < longest


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
    base = evaluate(_request(tiny_model_dir, mmlu_dir, tmp_path / "base"))
    assert base["scored"] == "base model (no adapter)"
    result = evaluate(_request(tiny_model_dir, mmlu_dir, tmp_path, peft_path=str(tiny_adapter)))
    assert result["scored"] == "adapter"
    rows = [json.loads(x) for x in Path(result["predictions_file"]).read_text().splitlines()]
    base_rows = [json.loads(x) for x in Path(base["predictions_file"]).read_text().splitlines()]
    for protocol, summary in result["protocols"].items():
        mine = [r for r in rows if r["protocol"] == protocol]
        assert len(mine) == summary["questions"] == 19
        assert summary["overall"]["correct"] == sum(r["correct"] for r in mine)
        stem = summary["categories"]["stem"]
        assert stem["accuracy"] == stem["correct"] / stem["total"]
    for row in (r for r in rows if r["protocol"] == "logprob"):
        likelihoods = row["loglikelihoods"]  # " A".." D", for per-question parity checks
        assert len(likelihoods) == 4 and all(x <= 0 for x in likelihoods)
        assert row["prediction"] == "ABCD"[likelihoods.index(max(likelihoods))]
    assert all("loglikelihoods" not in r for r in rows if r["protocol"] == "flowertune")
    # The adapter (B drawn at std 0.5) changes what the model answers.
    assert [r["prediction"] for r in rows] != [r["prediction"] for r in base_rows]
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


@pytest.mark.parametrize("limit", ["0", "-3", "all"])
def test_cli_refuses_a_question_limit_below_one(limit, capsys):
    """0 used to mean "no limit" and scored all 10,935 questions."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--base-model-name-path", "x", "--limit-per-subject", limit])
    assert exit_.value.code == 2
    assert "--limit-per-subject" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory):
    """A tiny model whose layers bitsandbytes' CPU inference kernels take (multiples of 64)."""
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny64"), hidden=64)


def test_evaluation_loads_4bit_without_the_training_upcast(tiny64_dir, monkeypatch):
    """k-bit training preparation upcasts embeddings, norms and LM head to fp32; the
    evaluation load keeps everything that is not quantized in the compute dtype."""
    monkeypatch.setattr(runner, "choose_precision",
                        lambda requested, quantization: Precision("cpu", "bf16", quantization))
    model, _, precision = runner.load_model(EvalRequest(base_model=str(tiny64_dir),
                                                        quantization=4))
    assert precision.quantization == 4
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    dense = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    assert dense == {torch.bfloat16}
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16


def test_a_4bit_model_is_freed_when_evaluation_returns(tiny64_dir, mmlu_dir, tmp_path,
                                                       monkeypatch):
    """bitsandbytes' 4-bit weights point back at their module: without an explicit collection
    the model (on a GPU: its memory) outlives the evaluation until the cyclic GC runs."""
    loaded = []
    load_model = runner.load_model

    def recording_load(request):
        model, tokenizer, precision = load_model(request)
        layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
        loaded.append(weakref.ref(layer))
        return model, tokenizer, precision

    monkeypatch.setattr(runner, "load_model", recording_load)
    gc.disable()  # only the explicit collection may free it
    try:
        evaluate(_request(tiny64_dir, mmlu_dir, tmp_path, quantization=4, protocols=("logprob",)))
        assert loaded and loaded[0]() is None
    finally:
        gc.enable()


class OutOfMemoryAbove(torch.nn.Module):
    """A model that runs out of (simulated) CUDA memory on batches of more than `rows`."""

    def __init__(self, model, rows: int):
        super().__init__()
        self.model, self.rows, self.batches = model, rows, []

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[0] > self.rows:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.batches.append(tuple(input_ids.shape))
        return self.model(input_ids=input_ids, **kwargs)


def test_out_of_memory_halves_the_batch_longest_first(tiny, mmlu_dir):
    model, tokenizer = tiny
    questions = load_questions(str(mmlu_dir), ("stem",), limit_per_subject=1)[:12]
    for run, reference in ((run_flowertune, reference_flowertune),
                           (run_logprob, reference_logprob)):
        expected = [p.prediction for p in reference(model, tokenizer, questions)]
        limited = OutOfMemoryAbove(model, rows=3)
        assert [p.prediction for p in run(limited, tokenizer, questions, batch_size=8)] == expected
        assert {rows for rows, _ in limited.batches} == {2}  # 8 -> 4 -> 2 rows per batch
        widths = [width for _, width in limited.batches]
        assert widths == sorted(widths, reverse=True)
        with pytest.raises(torch.OutOfMemoryError):
            run(OutOfMemoryAbove(model, rows=0), tokenizer, questions, batch_size=8)


def test_curve_loads_the_base_once_and_swaps_adapters_cleanly(tiny_model_dir, tiny_adapter,
                                                              mmlu_dir, tmp_path, monkeypatch):
    """Each adapter scored on the shared base predicts what it predicts on a fresh load: the
    previous round's adapter is gone. The base is loaded once and freed at the end."""
    second = tmp_path / "peft_2"
    shutil.copytree(tiny_adapter, second)
    weights = load_file(str(second / "adapter_model.safetensors"))
    save_file({k: -v for k, v in weights.items()}, str(second / "adapter_model.safetensors"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({
        "status": "completed", "config": {"model": {"name": str(tiny_model_dir)}},
        "adapters": {"1": str(tiny_adapter), "2": str(second)}}))
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"round": r, "comm_mb_total": r * 0.5}) + "\n" for r in (1, 2)))
    loads = []
    load_base = curve.load_base

    def recording_load(request):
        model, tokenizer, precision = load_base(request)
        loads.append(weakref.ref(model))
        return model, tokenizer, precision

    monkeypatch.setattr(curve, "load_base", recording_load)
    gc.disable()
    try:
        assert curve.main(["--run-dir", str(run_dir), "--mmlu-path", str(mmlu_dir),
                           "--limit-per-subject", "1", "--batch-size", "8"]) == 0
        assert len(loads) == 1 and loads[0]() is None
    finally:
        gc.enable()
    for server_round, adapter in ((1, tiny_adapter), (2, second)):
        fresh = evaluate(EvalRequest(base_model=str(tiny_model_dir), peft_path=str(adapter),
                                     mmlu_path=str(mmlu_dir), limit_per_subject=1, batch_size=8,
                                     progress=False, output=str(tmp_path / "fresh.json")))
        swapped = run_dir / "evaluation" / f"round_{server_round}.predictions.jsonl"
        assert swapped.read_text() == Path(fresh["predictions_file"]).read_text()
