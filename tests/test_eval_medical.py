"""The medical suite: offline data as the data README verified it, FlowerTune's prompts and parser
quirks byte for byte, the batched leaderboard loop against FlowerTune's own per-prompt loop, and
the log-likelihood protocol against unbatched forward passes."""

import json
import shutil
from collections import Counter

import pytest
import torch
from tiny import SHARED_DATA
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation.medical import (
    BENCHMARKS,
    INSTRUCTIONS,
    _four_option_items,
    leaderboard_new_tokens,
    leaderboard_prompt,
    load_items,
    robust_prompt,
    run_protocol,
)
from evaluation.protocols import flowertune_answer, flowertune_wrap, harness_encode_pair
from evaluation.suite import Item, NotAvailable, Options

DATA = str(SHARED_DATA)
MEDMCQA_INSTRUCTION = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on "
    "your understanding of basic and clinical science, medical knowledge, and mechanisms "
    "underlying health, disease, patient care, and modes of therapy, answer the following "
    "multiple-choice question. Select one correct answer from A to D. Base your answer on the "
    "current and standard practices referenced in medical guidelines."
)
MEDQA_INSTRUCTION = (
    "You are a medical doctor taking the US Medical Licensing Examination. You need to "
    "demonstrate your understanding of basic and clinical science, medical knowledge, and "
    "mechanisms underlying health, disease, patient care, and modes of therapy. Show your "
    "ability to apply the knowledge essential for medical practice. For the following "
    "multiple-choice question, select one correct answer from A to E. Base your answer on the "
    "current and standard practices referenced in medical guidelines."
)
PUBMEDQA_INSTRUCTION = (
    "As an expert doctor in clinical science and medical knowledge, can you tell me if the "
    "following statement is correct? Answer yes, no, or maybe."
)


@pytest.fixture(scope="module")
def items():
    return {name: load_items(name, DATA, None) for name in ("pubmedqa", "medmcqa", "medqa")}


@pytest.mark.parametrize(("name", "mix"), [
    ("pubmedqa", {"yes": 276, "no": 169, "maybe": 55}),
    ("medmcqa", {"A": 1348, "B": 1085, "C": 925, "D": 825}),  # cop 1..4 in the original file
    ("medqa", {"A": 353, "B": 309, "C": 346, "D": 265}),
])
@pytest.mark.shared_data
def test_offline_sets_have_the_official_sizes_and_answer_mix(items, name, mix):
    assert len(items[name]) == BENCHMARKS[name].count == sum(mix.values())
    assert Counter(item.gold for item in items[name]) == mix
    assert len({item.qid for item in items[name]}) == len(items[name])


@pytest.mark.shared_data
def test_first_medmcqa_row_and_limit(items):
    first = items["medmcqa"][0]
    assert first.qid == "45258d3d-b974-44dd-a161-c3fccbdadd88" and first.gold == "A"
    assert first.data["question"] == (
        "Which of the following is not true for myelinated nerve fibers:")
    assert load_items("medmcqa", DATA, 3) == items["medmcqa"][:3]
    assert BENCHMARKS["careqa"].count == 5621


@pytest.mark.shared_data
def test_careqa_offline_is_not_available_and_a_missing_file_is_named(tmp_path):
    with pytest.raises(NotAvailable, match="not available offline: CareQA .*run online"):
        load_items("careqa", DATA, None)
    with pytest.raises(FileNotFoundError, match="medical/medqa/phrases_no_exclude_test.jsonl"):
        load_items("medqa", str(tmp_path), None)
    with pytest.raises(ValueError, match="unknown medical benchmark 'mmlu'"):
        load_items("mmlu", DATA, None)


@pytest.mark.shared_data
def test_pubmedqa_gold_is_checked_against_the_ground_truth_file(tmp_path):
    folder = tmp_path / "medical" / "pubmedqa"
    folder.mkdir(parents=True)
    shutil.copy(SHARED_DATA / "medical/pubmedqa/test_set.json", folder)
    truth = json.loads((SHARED_DATA / "medical/pubmedqa/test_ground_truth.json").read_text())
    truth["12377809"] = "no"
    (folder / "test_ground_truth.json").write_text(json.dumps(truth))
    with pytest.raises(ValueError, match="disagrees .* on 1 PMIDs"):
        load_items("pubmedqa", str(tmp_path), None)


def test_hub_rows_map_cop_like_flowertune():
    """MedMCQA on the hub counts cop from 0 (chr(65+cop)), CareQA from 1 (chr(64+cop))."""
    row = {"question": "Q", "op1": "w", "op2": "x", "op3": "y", "op4": "z", "cop": 2,
           "unique_id": "u"}
    (careqa,) = _four_option_items("careqa", [row], ("op1", "op2", "op3", "op4"), 1, "unique_id")
    (medmcqa,) = _four_option_items("medmcqa", [row], ("op1", "op2", "op3", "op4"), 0,
                                    "unique_id")
    assert (careqa.gold, medmcqa.gold, careqa.data["options"]) == ("B", "C", ["w", "x", "y", "z"])
    with pytest.raises(ValueError, match="cop 0 is not an option number"):
        _four_option_items("careqa", [{**row, "cop": 0}], ("op1", "op2", "op3", "op4"), 1,
                           "unique_id")


# ----------------------------------------------------------------------------- prompts


def _leaderboard_prompt(item: Item) -> str:
    return flowertune_wrap(leaderboard_prompt(item))


@pytest.mark.shared_data
def test_medmcqa_prompts_byte_for_byte(items):
    item = items["medmcqa"][0]
    options = ("A. Impulse through myelinated fibers is slower than non-myelinated fibers\n"
               "B. Membrane currents are generated at nodes of Ranvier\n"
               "C. Saltatory conduction of impulses is seen\n"
               "D. Local anesthesia is effective only when the nerve is not covered by myelin "
               "sheath\n")
    # The question ends in ":", so FlowerTune appends "?".
    assert _leaderboard_prompt(item) == (
        f"<|im_start|>question\n{MEDMCQA_INSTRUCTION}\nQuestion: Which of the following is not "
        f"true for myelinated nerve fibers:?\n\nOptions:\n{options}The answer is:\n<|im_end|>\n"
        "<|im_start|>answer\n")
    assert robust_prompt(item) == (
        "Question: Which of the following is not true for myelinated nerve fibers:\nChoices:\n"
        f"{options}Answer:")


@pytest.mark.shared_data
def test_medqa_prompts_byte_for_byte(items):
    item = items["medqa"][0]
    question = (
        "A junior orthopaedic surgery resident is completing a carpal tunnel repair with the "
        "department chairman as the attending physician. During the case, the resident "
        "inadvertently cuts a flexor tendon. The tendon is repaired without complication. The "
        "attending tells the resident that the patient will do fine, and there is no need to "
        "report this minor complication that will not harm the patient, as he does not want to "
        "make the patient worry unnecessarily. He tells the resident to leave this complication "
        "out of the operative report. Which of the following is the correct next action for the "
        "resident to take?")
    options = ("A. Disclose the error to the patient and put it in the operative report\n"
               "B. Tell the attending that he cannot fail to disclose this mistake\n"
               "C. Report the physician to the ethics committee\n"
               "D. Refuse to dictate the operative report\n")
    assert item.gold == "B"
    assert _leaderboard_prompt(item) == (
        f"<|im_start|>question\n{MEDQA_INSTRUCTION}\nQuestion: {question}\n\nOptions:\n{options}"
        "The answer is:\n<|im_end|>\n<|im_start|>answer\n")
    assert robust_prompt(item) == f"Question: {question}\n{options}Answer:"


@pytest.mark.shared_data
def test_pubmedqa_prompts_byte_for_byte(items):
    (item,) = [i for i in items["pubmedqa"] if i.qid == "21214884"]
    contexts = (
        "Using polymerase chain reaction techniques, we evaluated the presence of HPV infection "
        "in human breast milk collected from 21 HPV-positive and 11 HPV-negative mothers.\n"
        "Of the 32 studied human milk specimens, no 'high-risk' HPV 16, 18, 31, 33, 35, 39, 45, "
        "51, 52, 56, 58 or 58 DNA was detected.")
    question = "Can 'high-risk' human papillomaviruses (HPVs) be detected in human breast milk?"
    assert item.gold == "no"
    assert _leaderboard_prompt(item) == (
        f"<|im_start|>question\n{PUBMEDQA_INSTRUCTION}\n{contexts}\n{question}\nThe answer is:\n"
        "<|im_end|>\n<|im_start|>answer\n")
    assert robust_prompt(item) == f"Abstract: {contexts}\nQuestion: {question}\nAnswer:"


def test_careqa_shares_medmcqas_instruction_and_question_mark_rule():
    assert INSTRUCTIONS["careqa"] == INSTRUCTIONS["medmcqa"] == MEDMCQA_INSTRUCTION
    quoted = Item("careqa", "u", "A", {"question": 'He said "stop"', "options": list("wxyz")})
    ended = Item("careqa", "v", "A", {"question": "Pick one.", "options": list("wxyz")})
    assert 'Question: He said "stop"?\n\nOptions:\nA. w\nB. x\nC. y\nD. z\nThe answer is:\n' in \
        _leaderboard_prompt(quoted)
    assert "Question: Pick one.\n\n" in _leaderboard_prompt(ended)
    assert robust_prompt(quoted) == (
        'Question: He said "stop"\nChoices:\nA. w\nB. x\nC. y\nD. z\nAnswer:')


# ----------------------------------------------------------------------------- parser


@pytest.mark.parametrize(("output", "gold", "boolean", "expected"), [
    ("Answer: C", "A", False, ("a", True)),  # the first character of "answer"
    ("Answer: C", "C", False, ("a", False)),
    (" b", "B", False, ("b", True)),
    ("E", "A", False, ("e", False)),  # "e" is a valid answer, and wrong
    ("yes", "A", False, (None, False)),  # "y" is not valid: raw "yes" != "a"
    ("\n## B\nC", "B", False, ("b", True)),  # the line after "\n##"
    ("maybe", "maybe", True, (None, True)),  # not valid: the raw output equals the gold
    ("Maybe", "maybe", True, (None, True)),  # both lowercased
    ("Maybe.", "maybe", True, (None, False)),
    (" maybe", "maybe", True, (None, False)),  # BPE's leading space
    ("x\n## maybe", "maybe", True, (None, False)),  # the fallback compares the WHOLE output
    ("yesyes", "yes", True, ("yes", True)),
    ("noyes", "no", True, ("no", True)),
    ("yesno", "no", True, ("yes", False)),
    ("nonono", "no", True, (None, False)),  # one repair: "nono", not valid
    ("Yes.", "yes", True, ("yes", True)),
    ("yes, it is", "yes", True, (None, False)),  # boolean keeps the whole string
    ("", "maybe", True, (None, False)),
])
def test_leaderboard_parser_quirks(output, gold, boolean, expected):
    assert flowertune_answer(output, gold, boolean) == expected


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.shared_data
def test_max_new_tokens_come_from_the_first_gold_of_each_16_row_batch(tiny, items):
    """PubMedQA's test file runs yes (0-275), no (276-444), maybe (445-499). The tiny tokenizer
    splits "yes"/"no" in 2 tokens and "maybe" in 4, so rows 445-447, in the batch 432-447 that
    starts with a "no", get 2 new tokens, too few for their own gold."""
    _, tokenizer = tiny
    assert [len(tokenizer(g, add_special_tokens=False)["input_ids"])
            for g in ("yes", "no", "maybe")] == [2, 2, 4]
    steps = leaderboard_new_tokens(tokenizer, [item.gold for item in items["pubmedqa"]])
    assert [items["pubmedqa"][i].gold for i in (444, 445, 447, 448)] == ["no"] + ["maybe"] * 3
    assert steps[432:448] == [2] * 16 and steps[448:] == [4] * 52
    assert leaderboard_new_tokens(tokenizer, ["A", "maybe"]) == [1, 1]


@torch.inference_mode()
def flowertune_inference(model, tokenizer, prompts: list[str], golds: list[str]) -> list[str]:
    """FlowerTune's `inference`, line for line: 16-row batches in order, max_new_tokens from
    the batch's first gold, one unpadded `generate` per prompt (no attention mask, pad = eos),
    outputs written back to every row with the same prompt."""
    written: dict[str, str] = {}
    for start in range(0, len(prompts), 16):
        batch, batch_golds = prompts[start:start + 16], golds[start:start + 16]
        max_new_tokens = len(tokenizer(batch_golds[0], add_special_tokens=False)["input_ids"])
        for prompt in batch:
            input_ids = tokenizer.encode(flowertune_wrap(prompt), return_tensors="pt")
            output_ids = model.generate(inputs=input_ids, max_new_tokens=max_new_tokens,
                                        do_sample=False, top_p=1.0, temperature=1.0,
                                        pad_token_id=tokenizer.eos_token_id)
            written[prompt] = tokenizer.decode(output_ids[0][len(input_ids[0]):],
                                               skip_special_tokens=True)
    return [written[p] for p in prompts]


def _reference_records(model, tokenizer, chosen: list[Item]):
    outputs = flowertune_inference(model, tokenizer, [leaderboard_prompt(i) for i in chosen],
                                   [i.gold for i in chosen])
    return [(out, *flowertune_answer(out, i.gold, i.benchmark == "pubmedqa"))
            for i, out in zip(chosen, outputs, strict=True)]


@pytest.mark.shared_data
@pytest.mark.parametrize("with_bos", [False, True], ids=["no-bos", "bos"])
def test_batched_leaderboard_equals_flowertunes_per_prompt_loop(tiny, tiny_model_dir, items,
                                                                with_bos):
    """Length-sorted, left-padded `generate` on batches grouped by max_new_tokens gives the raw
    output, parse and verdict of FlowerTune's one-generate-per-prompt loop: PubMedQA rows
    440-456 (max_new_tokens 2, then 4 from row 456, whose batch starts with a "maybe") and
    MedMCQA (1), also with a tokenizer that adds BOS."""
    model, tokenizer = tiny
    sets = [items["medmcqa"][:12]]
    if with_bos:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, add_bos_token=True)
        assert tokenizer.encode("Hello")[0] == tokenizer.bos_token_id
    else:
        sets.append(items["pubmedqa"][440:457])
    for chosen in sets:
        expected = _reference_records(model, tokenizer, chosen)
        seen = []
        records = run_protocol("leaderboard", chosen[0].benchmark, model, tokenizer, chosen,
                               Options(batch_size=5, progress=seen.append))
        got = [(r.raw_output, None if r.parsed is None else r.parsed.lower(), r.correct)
               for r in records]
        assert got == expected
        assert sum(seen) == len(chosen)
        assert [r.extra["max_new_tokens"] for r in records] == (
            [2] * 16 + [4] if chosen[0].benchmark == "pubmedqa" else [1] * 12)


def test_duplicate_prompts_share_the_last_occurrences_output(tiny):
    """Row 0 and row 16 hold the same question; row 16 starts a batch whose first gold
    ("maybe") allows 4 tokens, row 0's batch ("no") 2. FlowerTune's write-back gives row 0 the
    4-token output of row 16."""
    model, tokenizer = tiny

    def item(qid: str, gold: str, text: str) -> Item:
        return Item("pubmedqa", qid, gold, {"question": f"Is {text} safe?",
                                            "contexts": [f"We studied {text}.", "It helped."]})

    question = item("q", "no", "aspirin")
    chosen = [question, *(item(str(k), "yes", f"drug {k}") for k in range(15)),
              Item("pubmedqa", "twin", "maybe", question.data)]
    records = run_protocol("leaderboard", "pubmedqa", model, tokenizer, chosen,
                           Options(batch_size=4))
    alone = _reference_records(model, tokenizer, [question])[0][0]
    assert records[0].raw_output == records[16].raw_output == \
        _reference_records(model, tokenizer, chosen)[0][0]
    assert records[0].raw_output != alone  # the test only proves something if they differ
    assert (records[0].extra["max_new_tokens"], records[16].extra["max_new_tokens"]) == (2, 4)


@pytest.mark.shared_data
def test_robust_picks_the_argmax_of_unbatched_loglikelihoods(tiny, items):
    """Each choice scored alone (the harness's request: context + continuation, one forward
    pass) gives the recorded log-likelihoods; the prediction is their argmax. PubMedQA's
    " maybe" is 4 tiny tokens, so its set runs the multi-token path."""
    model, tokenizer = tiny
    for chosen in (items["medqa"][:4], items["pubmedqa"][440:442]):
        records = run_protocol("robust", chosen[0].benchmark, model, tokenizer, chosen,
                               Options(batch_size=3))
        for item, record in zip(chosen, records, strict=True):
            scores = {}
            for choice in record.extra["loglikelihoods"]:
                context, continuation = harness_encode_pair(tokenizer, robust_prompt(item),
                                                            f" {choice}")
                ids = torch.tensor([(context + continuation)[:-1]])
                with torch.inference_mode():
                    logprobs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
                tail = logprobs[-len(continuation):]
                scores[choice] = float(sum(tail[k, t] for k, t in enumerate(continuation)))
            assert list(scores) == (["yes", "no", "maybe"] if item.benchmark == "pubmedqa"
                                    else list("ABCD"))
            assert torch.allclose(torch.tensor(list(record.extra["loglikelihoods"].values())),
                                  torch.tensor(list(scores.values())), atol=1e-4, rtol=0)
            assert record.parsed == max(scores, key=scores.__getitem__)
            assert record.correct == (record.parsed == item.gold)
            assert record.raw_output is None and record.prompt == robust_prompt(item)


@pytest.mark.shared_data
def test_run_protocol_rejects_an_unknown_protocol_and_foreign_items(tiny, items):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="unknown protocol 'flowertune'"):
        run_protocol("flowertune", "medqa", model, tokenizer, items["medqa"][:1], Options())
    with pytest.raises(ValueError, match="items of another benchmark"):
        run_protocol("robust", "medqa", model, tokenizer, items["medmcqa"][:1], Options())
