"""The medical challenge's evaluation suite: PubMedQA, MedMCQA, MedQA and CareQA.

leaderboard: FlowerTune's medical evaluation (adap/flower, benchmarks/flowertune-llm/evaluation/
medical, `benchmarks.py` and `utils.py`), quirks included, so the numbers sit in its table:
Meditron's instruction, `{instruction}\\n{body}\\nThe answer is:\\n` in the pseudo-ChatML wrapper,
greedy generation of as many tokens as the FIRST gold of each 16-row batch has, the first-character
/ whole-string parser with its raw-output fallback, and outputs written back by prompt string.

robust: lm-evaluation-harness's own zero-shot tasks for these sets (`pubmedqa`, `medmcqa`,
`medqa_4options`, `careqa_en`), scored by log-likelihood: the choice whose continuation
(" A".." D", or " yes"/" no"/" maybe") is most likely after the prompt. Chosen over re-using the
leaderboard's instruction because those prompts are what published lm-eval medical numbers
(e.g. the Open Medical-LLM leaderboard) use, and the MMLU robust protocol is lm-eval's too. The
prompts, byte for byte as the harness's `doc_to_text` builds them:
- PubMedQA: `Abstract: {CONTEXTS joined by "\\n"}\\nQuestion: {QUESTION}\\nAnswer:`
- MedMCQA, CareQA: `Question: {question}\\nChoices:\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:`
- MedQA: `Question: {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:`
Nothing can fail to parse, and the answer does not depend on how the model formats it.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from evaluation.protocols import (
    _in_batches,
    _left_padded,
    _longest_first,
    continuation_scores,
    flowertune_answer,
    flowertune_example,
    flowertune_wrap,
    harness_encode_pair,
)
from evaluation.suite import Benchmark, Item, NotAvailable, Options, Record

log = logging.getLogger(__name__)

BENCHMARKS = {
    "pubmedqa": Benchmark("pubmedqa", "PubMedQA",
                          "bigbio/pubmed_qa (pubmed_qa_labeled_fold0_source, test)",
                          "medical/pubmedqa/test_set.json", 500),
    "medmcqa": Benchmark("medmcqa", "MedMCQA", "openlifescienceai/medmcqa (validation)",
                         "medical/medmcqa/dev.json", 4183),
    "medqa": Benchmark("medqa", "MedQA", "bigbio/med_qa (med_qa_en_4options_source, test)",
                       "medical/medqa/phrases_no_exclude_test.jsonl", 1273),
    "careqa": Benchmark("careqa", "CareQA", "HPAI-BSC/CareQA (CareQA_en, test)", None, 5621),
}

# Byte for byte from `INSTRUCTIONS` in FlowerTune's medical benchmarks.py (adap/flower commit
# 62eb72ab773c255052e0c672fc1ac9bfa0c8a06a), which took them from Meditron's instructions.json.
# MedQA's says "A to E" although only four options are shown.
INSTRUCTIONS = {
    "pubmedqa": "As an expert doctor in clinical science and medical knowledge, can you tell me if the following statement is correct? Answer yes, no, or maybe.",  # noqa: E501
    "medqa": "You are a medical doctor taking the US Medical Licensing Examination. You need to demonstrate your understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, patient care, and modes of therapy. Show your ability to apply the knowledge essential for medical practice. For the following multiple-choice question, select one correct answer from A to E. Base your answer on the current and standard practices referenced in medical guidelines.",  # noqa: E501
    "medmcqa": "You are a medical doctor answering realworld medical entrance exam questions. Based on your understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, patient care, and modes of therapy, answer the following multiple-choice question. Select one correct answer from A to D. Base your answer on the current and standard practices referenced in medical guidelines.",  # noqa: E501
    "careqa": "You are a medical doctor answering realworld medical entrance exam questions. Based on your understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, patient care, and modes of therapy, answer the following multiple-choice question. Select one correct answer from A to D. Base your answer on the current and standard practices referenced in medical guidelines.",  # noqa: E501
}

LETTERS = "ABCD"
PUBMEDQA_CHOICES = ("yes", "no", "maybe")
# FlowerTune's medical batch size: max_new_tokens is set per batch of this many rows in order,
# whatever batch size our own computation uses.
LEADERBOARD_BATCH = 16

# Where the bigbio loading scripts read their data (datasets >= 4 no longer runs scripts, so the
# online path reads the same files the scripts did).
_PUBMEDQA_ZIP = ("bigbio/pubmed_qa", "pqal.zip", "pqal_test_set.json")
_MEDQA_ZIP = ("bigbio/med_qa", "data_clean.zip",
              "data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl")


# ----------------------------------------------------------------------------- items


def _pubmedqa_items(records: dict[str, dict]) -> list[Item]:
    return [Item("pubmedqa", pmid, r["final_decision"],
                 {"question": r["QUESTION"], "contexts": list(r["CONTEXTS"])})
            for pmid, r in records.items()]


def _medqa_items(rows: list[dict]) -> list[Item]:
    """Gold: the first option key whose text equals `answer`, as FlowerTune computes it."""
    items = []
    for index, row in enumerate(rows):
        options = dict(row["options"])
        gold = next((key for key, text in options.items() if text == row["answer"]), None)
        if gold is None:
            raise ValueError(f"MedQA row {index}: answer {row['answer']!r} is none of its options")
        items.append(Item("medqa", str(index), gold,
                          {"question": row["question"], "options": list(options.values())}))
    return items


def _four_option_items(name: str, rows: list[dict], fields: tuple[str, ...], first_cop: int,
                       qid: str) -> list[Item]:
    """MedMCQA (opa..opd) and CareQA (op1..op4); `cop` counts from `first_cop`."""
    items = []
    for row in rows:
        question = row["question"]
        if question is None:  # lm-eval patches one such CareQA row; FlowerTune would crash
            log.warning("%s %s has no question text; scored with an empty question",
                        name, row[qid])
            question = ""
        answer = int(row["cop"]) - first_cop
        if not 0 <= answer < len(LETTERS):
            raise ValueError(f"{name} {row[qid]}: cop {row['cop']} is not an option number")
        items.append(Item(name, str(row[qid]), LETTERS[answer],
                          {"question": question, "options": [row[f] for f in fields]}))
    return items


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _local_items(name: str, data_dir: Path) -> list[Item]:
    path = data_dir / BENCHMARKS[name].local
    if not path.is_file():
        raise FileNotFoundError(f"{BENCHMARKS[name].title} file not found: {path}; --data-dir "
                                f"must hold {BENCHMARKS[name].local} (see shared/data/README.md)")
    if name == "pubmedqa":
        items = _pubmedqa_items(json.loads(path.read_text(encoding="utf-8")))
        truth_file = path.with_name("test_ground_truth.json")
        if truth_file.is_file():
            truth = json.loads(truth_file.read_text(encoding="utf-8"))
            wrong = [i.qid for i in items if truth.get(i.qid) != i.gold]
            if wrong or len(truth) != len(items):
                raise ValueError(f"{path} disagrees with {truth_file} on {len(wrong)} PMIDs "
                                 f"(e.g. {wrong[:3]}); the offline copy is damaged")
        return items
    if name == "medqa":
        return _medqa_items(_json_lines(path))
    # The original MedMCQA release numbers `cop` from 1; the hub copy from 0.
    return _four_option_items("medmcqa", _json_lines(path), ("opa", "opb", "opc", "opd"), 1, "id")


def _fetch(name: str, download: Callable[[], object]):
    """A hub download; any failure (no network, offline mode, a moved file) is NotAvailable."""
    try:
        return download()
    except Exception as err:  # the hub client's errors have no common base class
        benchmark = BENCHMARKS[name]
        raise NotAvailable(f"{benchmark.title} could not be loaded from the hub ({benchmark.hub}"
                           f"): {type(err).__name__}: {err}; pass --data-dir with the offline "
                           "files") from err


def _zip_member(repo: str, filename: str, member: str) -> str:
    from huggingface_hub import hf_hub_download

    with zipfile.ZipFile(hf_hub_download(repo, filename, repo_type="dataset")) as archive:
        return archive.read(member).decode("utf-8")


def _hub_items(name: str) -> list[Item]:
    if name == "pubmedqa":
        return _pubmedqa_items(json.loads(_fetch(name, lambda: _zip_member(*_PUBMEDQA_ZIP))))
    if name == "medqa":
        text = _fetch(name, lambda: _zip_member(*_MEDQA_ZIP))
        return _medqa_items([json.loads(line) for line in text.splitlines() if line.strip()])
    import datasets

    if name == "medmcqa":
        rows = _fetch(name, lambda: list(datasets.load_dataset("openlifescienceai/medmcqa",
                                                               split="validation")))
        return _four_option_items(name, rows, ("opa", "opb", "opc", "opd"), 0, "id")
    rows = _fetch(name, lambda: list(datasets.load_dataset("HPAI-BSC/CareQA", "CareQA_en",
                                                           split="test")))
    return _four_option_items(name, rows, ("op1", "op2", "op3", "op4"), 1, "unique_id")


def load_items(name: str, data_dir: str | None, limit: int | None) -> list[Item]:
    """The first `limit` items of a set in the official order: from the offline copies under
    `data_dir`, or from the hub when it is None. CareQA has no offline copy: NotAvailable."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown medical benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    benchmark = BENCHMARKS[name]
    if data_dir is not None and benchmark.local is None:
        raise NotAvailable(f"not available offline: {benchmark.title} ({benchmark.hub}) is "
                           "hub-only; run online (no --data-dir) to score it")
    items = _hub_items(name) if data_dir is None else _local_items(name, Path(data_dir))
    return items[:limit] if limit is not None else items


# ----------------------------------------------------------------------------- leaderboard


def leaderboard_prompt(item: Item) -> str:
    """FlowerTune's prompt before the wrapper; outputs are written back by this string."""
    data = item.data
    if item.benchmark == "pubmedqa":
        body = "\n".join(data["contexts"]) + "\n" + data["question"]
    else:
        body = flowertune_example(data["question"], data["options"])
    return f"{INSTRUCTIONS[item.benchmark]}\n{body}\nThe answer is:\n"


def leaderboard_new_tokens(tokenizer, golds: Sequence[str]) -> list[int]:
    """Each row's max_new_tokens: the token count (no specials) of the first gold of its
    16-row batch, in order. One token for SmolLM2's letters and yes/no/maybe."""
    firsts = {start: len(tokenizer(golds[start], add_special_tokens=False)["input_ids"])
              for start in range(0, len(golds), LEADERBOARD_BATCH)}
    return [firsts[i - i % LEADERBOARD_BATCH] for i in range(len(golds))]


@torch.inference_mode()
def greedy_outputs(model, tokenizer, prompts: Sequence[str], new_tokens: Sequence[int],
                   batch_size: int, progress: Callable[[int], None] | None = None) -> list[str]:
    """What `model.generate(tokenizer.encode(p), max_new_tokens=n, do_sample=False)` decodes to
    (new tokens only, specials skipped) for each prompt, computed on length-sorted, left-padded
    batches of rows that share `n`. `generate` itself runs, so the model's generation_config
    processors (e.g. Qwen's repetition_penalty) apply as they do per prompt; the padding repeats
    each row's first token, so a penalty sees the same token set as the unpadded prompt."""
    device = next(model.parameters()).device
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    for steps in sorted(set(new_tokens)):
        rows = [i for i, n in enumerate(new_tokens) if n == steps]

        def run(batch: list[int], steps: int = steps) -> None:
            inputs = _left_padded([encoded[i] for i in batch], 0, device)  # 0: replaced below
            starts = inputs["attention_mask"].argmax(dim=-1, keepdim=True)  # first real token
            first = inputs["input_ids"].gather(1, starts)
            ids = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], first)
            generated = model.generate(
                input_ids=ids, attention_mask=inputs["attention_mask"], max_new_tokens=steps,
                do_sample=False, top_p=1.0, temperature=1.0, pad_token_id=tokenizer.eos_token_id,
            )[:, ids.shape[1]:].tolist()
            for row, i in enumerate(batch):
                outputs[i] = tokenizer.decode(generated[row], skip_special_tokens=True)
            if progress:
                progress(len(batch))

        _in_batches([rows[k] for k in _longest_first([len(encoded[i]) for i in rows])],
                    batch_size, run)
    return outputs


def run_leaderboard(model, tokenizer, items: Sequence[Item], options: Options) -> list[Record]:
    prompts = [leaderboard_prompt(item) for item in items]
    new_tokens = leaderboard_new_tokens(tokenizer, [item.gold for item in items])
    outputs = greedy_outputs(model, tokenizer, [flowertune_wrap(p) for p in prompts], new_tokens,
                             options.batch_size, options.progress)
    # FlowerTune writes each batch's outputs back to every row with the same prompt string, so
    # the last occurrence's output is what all duplicates keep.
    by_prompt = dict(zip(prompts, outputs, strict=True))
    records = []
    for item, prompt, steps in zip(items, prompts, new_tokens, strict=True):
        output = by_prompt[prompt]
        answer, correct = flowertune_answer(output, item.gold,
                                            boolean=item.benchmark == "pubmedqa")
        parsed = answer if answer is None or item.benchmark == "pubmedqa" else answer.upper()
        records.append(Record(item.benchmark, item.qid, flowertune_wrap(prompt), item.gold,
                              output, parsed, correct, {"max_new_tokens": steps}))
    return records


# ----------------------------------------------------------------------------- robust


def robust_prompt(item: Item) -> str:
    """lm-evaluation-harness's `doc_to_text` for the set (see the module docstring)."""
    data = item.data
    if item.benchmark == "pubmedqa":
        return "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(data["contexts"]),
                                                            data["question"])
    options = "".join(f"{letter}. {text}\n" for letter, text in zip(LETTERS, data["options"],
                                                                    strict=True))
    choices_line = "" if item.benchmark == "medqa" else "Choices:\n"
    return f"Question: {data['question']}\n{choices_line}{options}Answer:"


def robust_choices(name: str) -> tuple[str, ...]:
    return PUBMEDQA_CHOICES if name == "pubmedqa" else tuple(LETTERS)


def run_robust(model, tokenizer, items: Sequence[Item], options: Options) -> list[Record]:
    """Argmax over the choices' summed log-likelihoods (lm-eval's `acc`), the first of equal
    maxima; one shared forward pass per prompt when every continuation is one token."""
    prompts, continuations = [], []
    for item in items:
        context = robust_prompt(item)
        pairs = [harness_encode_pair(tokenizer, context, f" {choice}")
                 for choice in robust_choices(item.benchmark)]
        prompts.append(pairs[0][0])  # the context's tokens do not depend on the choice
        continuations.append([continuation for _, continuation in pairs])
    scores = continuation_scores(model, tokenizer, prompts, continuations, options.batch_size,
                                 options.progress)
    records = []
    for qi, item in enumerate(items):
        choices = robust_choices(item.benchmark)
        best = choices[int(torch.argmax(scores[qi]))]
        records.append(Record(item.benchmark, item.qid, robust_prompt(item), item.gold, None,
                              best, best == item.gold,
                              {"loglikelihoods": dict(zip(choices, scores[qi].tolist(),
                                                          strict=True))}))
    return records


_PROTOCOLS = {"leaderboard": run_leaderboard, "robust": run_robust}


def run_protocol(protocol: str, name: str, model, tokenizer, items: Sequence[Item],
                 options: Options) -> list[Record]:
    if protocol not in _PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(_PROTOCOLS)}")
    if any(item.benchmark != name for item in items):
        raise ValueError(f"run_protocol({name!r}) was given items of another benchmark")
    return _PROTOCOLS[protocol](model, tokenizer, items, options)
