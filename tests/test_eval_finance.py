"""Finance suite: the three evaluation sets as the leaderboard scores them (real offline files),
the offline training stand-in, and both protocols' mechanics on tiny random models."""

import json
import math
import shutil
from collections import Counter

import pytest
import torch
from datasets import Dataset
from tiny import SHARED_DATA
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from evaluation import finance
from evaluation.protocols import harness_encode_pair
from evaluation.suite import Item, NotAvailable, Options
from flowertune_nlp import finance_sources as sources
from flowertune_nlp.models import load_tokenizer

DATA = str(SHARED_DATA)


@pytest.mark.parametrize("name, first, gold, mix", [
    ("fpb", "L&T has also made a commitment", "neutral",
     {"neutral": 729, "positive": 338, "negative": 145}),
    ("fiqa", "This $BBBY stock options trade", "positive",
     {"positive": 181, "negative": 99, "neutral": 24}),
    ("tfns", "$ALLY - Ally Financial pulls outlook", "negative",
     {"neutral": 1566, "positive": 475, "negative": 347}),
])
@pytest.mark.shared_data
def test_offline_sets_are_the_leaderboards(name, first, gold, mix):
    """Sizes, first item and label mix match the leaderboard's published fingerprints."""
    items = finance.load_items(name, DATA, None)
    assert len(items) == finance.BENCHMARKS[name].count == sum(mix.values())
    assert items[0].data["input"].startswith(first) and items[0].gold == gold
    assert Counter(i.gold for i in items) == mix
    assert [i.qid for i in items[:2]] == [f"{name}/0", f"{name}/1"]
    assert finance.load_items(name, DATA, 3) == items[:3]


@pytest.mark.shared_data
def test_fiqa_prompts_equal_the_leaderboards_byte_for_byte():
    """Every rebuilt prompt equals the leaderboard's own `context` (tweet/news instruction,
    mojibake and all), and the gold its `new_target`."""
    path = SHARED_DATA / sources.FIQA_REFERENCE_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    items = finance.load_items("fiqa", DATA, None)
    assert [finance.leaderboard_prompt(i.data) for i in items] == [r["context"] for r in rows]
    assert [i.gold for i in items] == [r["new_target"] for r in rows]


@pytest.mark.parametrize("n", [4846, 1213, 9, 4])
def test_numpy_split_is_datasets_train_test_split(n):
    """The offline split is what `datasets` itself computes on the hub rows."""
    rows = Dataset.from_dict({"i": list(range(n))})
    expected = rows.train_test_split(test_size=0.25, seed=42)["test"]["i"]
    assert sources.eval_split(n) == expected
    assert len(expected) == math.ceil(0.25 * n)


@pytest.mark.shared_data
def test_fpb_split_equals_the_leaderboard_prompt_format():
    item = finance.load_items("fpb", DATA, 1)[0]
    assert finance.leaderboard_prompt(item.data) == (
        "Instruction: What is the sentiment of this news? Please choose an answer from "
        "{negative/neutral/positive}.\nInput: L&T has also made a commitment to redeem the "
        "remaining shares by the end of 2011 .\nAnswer: ")


# ----------------------------------------------------------------------------- parsing

P = "Instruction: What is the sentiment of this news? Please choose an answer from " \
    "{negative/neutral/positive}.\nInput: Profit fell.\nAnswer: "


@pytest.mark.parametrize("generated, window, label", [
    ("negative", "negative", "negative"),
    ("Negative.", "Negative.", "negative"),
    ("neutral", "neutral", "neutral"),
    ("bearish", "bearish", "neutral"),  # neither word: neutral
    ("", "", "neutral"),
    ("Negative, not Positive", "Negative, not Positive", "positive"),  # positive first
    # an echoed instruction block inside the window makes any answer positive
    ("negative\nInstruction: What is the sentiment of this news? Please choose an answer from "
     "{negative/neutral/positive}.\nInput: x\n",
     "negative\nInstruction: What is the sentiment of this news? Please choose an answer from "
     "{negative/neutral/positive}.\nInput: x\n", "positive"),
    # only the text up to the second "Answer: " counts
    ("negative\nAnswer: positive", "negative\n", "negative"),
])
def test_leaderboard_parser_quirks(generated, window, label):
    assert finance.answer_window(P + generated) == window
    assert finance.change_target(window) == label


def test_no_answer_marker_is_none_and_neutral():
    """A decoded text without "Answer: " (e.g. the space merged away) parses as "None"."""
    window = finance.answer_window("Instruction: x\nInput: y\nAnswer:positive")
    assert window == "None" and finance.change_target(window) == "neutral"


# ----------------------------------------------------------------------------- protocols


def _items(n: int) -> list[Item]:
    return finance.load_items("fpb", DATA, n)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.shared_data
def test_robust_picks_the_most_likely_label_batched_as_unbatched(tiny):
    """Batched scores equal one unbatched forward pass per prompt + label, and the answer is
    their argmax."""
    model, tokenizer = tiny
    items = _items(7)
    done: list[int] = []
    records = finance.run_protocol("robust", "fpb", model, tokenizer, items,
                                   Options(batch_size=4, progress=done.append))
    assert sum(done) == len(items)
    for item, record in zip(items, records, strict=True):
        context = finance.leaderboard_prompt(item.data)[:-1]
        assert record.prompt == context and context.endswith("\nAnswer:")
        expected = []
        for label in sources.LABELS:
            ids, cont = harness_encode_pair(tokenizer, context, f" {label}")
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + cont])).logits[0]
            logprobs = torch.log_softmax(logits, -1)[len(ids) - 1:-1]
            expected.append(float(logprobs[range(len(cont)), cont].sum()))
        got = [record.extra["loglikelihoods"][label] for label in sources.LABELS]
        assert got == pytest.approx(expected, abs=1e-4)
        assert record.parsed == sources.LABELS[expected.index(max(expected))]
        assert record.correct == (record.parsed == item.gold)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pad_is_eos(tiny_model_dir, tmp_path_factory, request):
    """A tiny model whose tokenizer files say pad == eos (as SmolLM2's and Llama's do), with
    tied or untied embeddings: the leaderboard adds `[PAD]` and resizes the embeddings."""
    target = tmp_path_factory.mktemp(f"pad-is-eos-{request.param}")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = request.param
    config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    # The model's generation_config decides, as on the leaderboard: here a few tokens, so the
    # test runs in seconds instead of generating up to 512 tokens.
    model.generation_config.max_new_tokens = 4
    return model, load_tokenizer(str(target))  # our loader swaps pad == eos for another token


def _snapshot(model, tokenizer) -> dict:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    return {"params": {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()},
            "vocab": model.config.vocab_size, "tokens": len(tokenizer),
            "pad": tokenizer.pad_token, "logits": logits,
            "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight}


def _assert_same(before: dict, after: dict) -> None:
    assert before["params"].keys() == after["params"].keys()
    for name, (identity, tensor) in before["params"].items():
        assert after["params"][name][0] == identity, name
        assert torch.equal(after["params"][name][1], tensor), name
    for key in ("vocab", "tokens", "pad", "tied"):
        assert before[key] == after[key], key
    assert torch.equal(before["logits"], after["logits"])


def test_leaderboard_reads_the_pad_rule_from_the_model_files(pad_is_eos):
    model, tokenizer = pad_is_eos
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # load_tokenizer's fix
    own = finance._leaderboard_tokenizer(tokenizer)
    assert own.pad_token_id == own.eos_token_id and own is not tokenizer
    before = _snapshot(model, tokenizer)
    with finance._leaderboard_pad_token(model, own):
        assert own.pad_token == "[PAD]" and own.pad_token_id == before["tokens"]
        assert model.get_input_embeddings().weight.shape[0] == before["tokens"] + 1
        assert model.get_output_embeddings().weight.shape[0] == before["tokens"] + 1
    _assert_same(before, _snapshot(model, tokenizer))


@pytest.mark.shared_data
def test_leaderboard_leaves_model_and_tokenizer_as_found(pad_is_eos):
    """The `[PAD]` resize is undone: every parameter is the same object with the same values,
    the config's vocabulary size and the tying are back, the caller's tokenizer is untouched,
    and the robust protocol scores exactly as before."""
    model, tokenizer = pad_is_eos
    items = _items(5)
    before = _snapshot(model, tokenizer)
    robust_before = finance.run_protocol("robust", "fpb", model, tokenizer, items, Options())
    done: list[int] = []
    records = finance.run_protocol(
        "leaderboard", "fpb", model, tokenizer, items,
        Options(progress=done.append, extra={"leaderboard_batch_size": 2}))
    assert done == [2, 2, 1]
    for item, record in zip(items, records, strict=True):
        assert record.prompt == finance.leaderboard_prompt(item.data)
        assert record.parsed == finance.change_target(record.raw_output)
        assert record.extra["answer_found"] and record.gold == item.gold
    _assert_same(before, _snapshot(model, tokenizer))
    robust_after = finance.run_protocol("robust", "fpb", model, tokenizer, items, Options())
    assert [r.extra for r in robust_after] == [r.extra for r in robust_before]


@pytest.mark.shared_data
def test_leaderboard_is_seeded(tiny, monkeypatch):
    """A sampling model (its generation_config says so) gives the same answers run after run:
    the seed is set per run; another seed gives other answers."""
    model, tokenizer = tiny
    model.generation_config.update(do_sample=True, max_new_tokens=8)

    def answers() -> list[str]:
        return [r.raw_output for r in finance.run_protocol("leaderboard", "fpb", model,
                                                           tokenizer, _items(2), Options())]
    try:
        first, again = answers(), answers()
        monkeypatch.setattr(finance, "LEADERBOARD_SEED", 7)
        other = answers()
    finally:
        model.generation_config.update(do_sample=False, max_new_tokens=None)
    assert first == again and other != first


@pytest.mark.shared_data
def test_summary_counts_labels_and_missing_windows(tiny):
    model, tokenizer = tiny
    records = finance.run_protocol("robust", "fpb", model, tokenizer, _items(3), Options())
    extra = finance.summarize_extra("robust", records)
    assert sum(extra["predicted"].values()) == 3 and "no_answer_window" not in extra


@pytest.mark.shared_data
def test_unknown_names_are_errors(tiny):
    with pytest.raises(ValueError, match="known: fpb, fiqa, tfns"):
        finance.load_items("nwgi", DATA, None)
    with pytest.raises(ValueError, match="valid: leaderboard, robust"):
        finance.run_protocol("logprob", "fpb", *tiny, [], Options())


def test_hub_sets_offline_are_not_available():
    """Without --data-dir and without the hub, a set is "not run", with the way out named."""
    with pytest.raises(NotAvailable, match="--data-dir"):
        finance.load_items("tfns", None, 1)


# ----------------------------------------------------------------------------- stand-in


@pytest.mark.shared_data
def test_standin_holds_no_evaluation_sentence():
    """4,484 rows: FPB's 3,634 rows outside the split less 5 that repeat a split sentence,
    and the 855 FiQA annotations whose sentence is not among the 304 evaluated, including
    the 3 evaluated sentences the leaderboard stores as mojibake."""
    rows = sources.build_finance_standin(SHARED_DATA)
    assert len(rows) == 4484
    inputs = [r["input"] for r in rows]
    news = Counter(r["instruction"] == sources.NEWS_INSTRUCTION for r in rows)
    assert news == {True: 3629 + 360, False: 495}
    assert {r["output"] for r in rows} == set(sources.LABELS)
    evaluated = [i.data["input"] for name in finance.BENCHMARKS
                 for i in finance.load_items(name, DATA, None)]
    assert len(evaluated) == 1212 + 304 + 2388
    assert not set(inputs) & set(evaluated)
    assert not {sources.normalize(t) for t in inputs} & {sources.normalize(t) for t in evaluated}
    # The 3 evaluated FiQA sentences the leaderboard stores as mojibake are spelt otherwise
    # in the raw files (e.g. "today’s"): those spellings are excluded too.
    raw = {e.text for e in sources.read_fiqa_annotations(SHARED_DATA)}
    garbled = [e.text for e in sources.read_fiqa_reference(SHARED_DATA) if e.text not in raw]
    assert len(garbled) == 3
    spelt = [t for t in raw if sources.normalize(t) in {sources.normalize(g) for g in garbled}]
    assert len(spelt) == 3 and not set(spelt) & set(inputs)
    assert ("$KO had missed earnings expectations for the last two quarters, so today’s "
            "strong results came as a major surprise http://stks.co/d0RHF") in spelt
    assert sources.build_finance_standin(SHARED_DATA) == rows


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def data_copy(tmp_path):
    shutil.copytree(SHARED_DATA / "finance", tmp_path / "finance")
    return tmp_path


@pytest.mark.shared_data
def test_missing_file_names_it_and_the_hub_id(data_copy):
    (data_copy / sources.TFNS_FILE).unlink()
    with pytest.raises(ValueError, match=r"sent_valid\.csv is missing.*zeroshot/twitter"):
        finance.load_items("tfns", str(data_copy), None)
    with pytest.raises(ValueError, match=r"sent_valid\.csv is missing"):
        sources.build_finance_standin(data_copy)


def _corrupt(path, line: int, text: str, encoding: str = "utf-8") -> None:
    lines = path.read_bytes().decode(encoding).split("\n")
    lines[line - 1] = text
    path.write_bytes("\n".join(lines).encode(encoding))


@pytest.mark.parametrize("relative, line, text, message", [
    (sources.FPB_FILE, 3, "no label here\r", r"Sentences_50Agree\.txt line 3: expected"),
    (sources.FPB_FILE, 7, "Fine sentence .@bullish\r", r"Sentences_50Agree\.txt line 7"),
    (sources.TFNS_FILE, 4, "some tweet,5", r"sent_valid\.csv line 4: expected"),
    (sources.FIQA_REFERENCE_FILE, 2, '{"context": "Question: x", "new_target": "positive"}',
     r"generation_fiqa_fl\.jsonl line 2: not a FlowerTune finance prompt"),
    (sources.FIQA_REFERENCE_FILE, 5, "{not json", r"generation_fiqa_fl\.jsonl line 5"),
])
@pytest.mark.shared_data
def test_malformed_rows_name_file_and_line(data_copy, relative, line, text, message):
    _corrupt(data_copy / relative, line, text,
             "iso-8859-1" if relative == sources.FPB_FILE else "utf-8")
    with pytest.raises(ValueError, match=message):
        sources.build_finance_standin(data_copy)


@pytest.mark.shared_data
def test_malformed_fiqa_score_names_the_entry(data_copy):
    path = data_copy / "finance/fiqa-2018/task1_post_ABSA_test.json"
    entries = json.loads(path.read_text())
    first = next(iter(entries))
    entries[first]["info"][0]["sentiment_score"] = "high"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=rf"task1_post_ABSA_test\.json entry 1 \(id {first}\)"):
        sources.build_finance_standin(data_copy)
