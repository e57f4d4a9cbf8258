"""The finance challenge's evaluation suite (evaluation/suite.py's interface): three-way
sentiment on FPB, FiQA and TFNS, scored two ways.

leaderboard: FlowerTune's finance evaluation reproduced step for step, quirks included, so the
numbers sit in its table: its prompt, its tokenizer set-up (a new `[PAD]` token when there is no
pad token or pad == eos), chunks of 32 in order with the tokenizer's own padding side, free
generation up to 512 tokens (prompt included) under the model's generation_config (instruct
models sample, from seed 2024), and substring parsing that calls everything without
"positive"/"negative" neutral.

robust: which of " negative", " neutral", " positive" the model finds most likely after the
same prompt (lm-evaluation-harness style, `Answer:` without the trailing space). Nothing can
fail to parse, no sampling, no dependence on the batch's neighbours.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from evaluation.protocols import continuation_scores, harness_encode_pair
from evaluation.suite import Benchmark, Item, NotAvailable, Options, Record
from flowertune_nlp import finance_sources as sources
from flowertune_nlp.finance_sources import LABELS, NEWS_INSTRUCTION, TWEET_INSTRUCTION, Example

BENCHMARKS = {
    "fpb": Benchmark("fpb", "FPB", f"{sources.FPB_HUB}, 25 % test split, seed 42",
                     sources.FPB_FILE, 1212),
    "fiqa": Benchmark("fiqa", "FiQA", f"{sources.FIQA_HUB}, 25 % test split, seed 42",
                      sources.FIQA_REFERENCE_FILE, 304),
    "tfns": Benchmark("tfns", "TFNS", sources.TFNS_HUB, sources.TFNS_FILE, 2388),
}
# The leaderboard's command line: --batch-size=32; generate(max_length=512); seed at import.
# `Options.batch_size` is the robust protocol's; the leaderboard's chunk size changes its
# results (padding neighbours, the sampling stream), so it stays 32 unless
# `options.extra["leaderboard_batch_size"]` says otherwise.
LEADERBOARD_BATCH_SIZE = 32
LEADERBOARD_MAX_LENGTH = 512
LEADERBOARD_SEED = 2024


def load_items(name: str, data_dir: str | None, limit: int | None) -> list[Item]:
    """The first `limit` items of a set in the leaderboard's order, from the offline files under
    `data_dir` (../shared/data layout) or, with None, from the hub."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown finance benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    examples = _offline(name, Path(data_dir)) if data_dir is not None else _from_hub(name)
    return [Item(name, f"{name}/{i}", e.label, {"instruction": e.instruction, "input": e.text})
            for i, e in enumerate(examples[:limit])]


def _offline(name: str, data_dir: Path) -> list[Example]:
    if name == "fpb":
        return sources.fpb_eval(data_dir)
    if name == "fiqa":
        return sources.read_fiqa_reference(data_dir)
    return sources.read_tfns(data_dir)


def _load_dataset(*args, **kwargs):
    """`datasets.load_dataset`, with any failure to get the data (no network, a hub script
    the installed `datasets` no longer runs) reported as NotAvailable."""
    from datasets import load_dataset

    try:
        return load_dataset(*args, **kwargs)
    except Exception as err:  # whatever the hub or the loader raises: the set is not here
        raise NotAvailable(f"{args[0]} could not be loaded from the hub ({type(err).__name__}: "
                           f"{err}); pass --data-dir with the offline copies (finance/)"
                           ) from err


def _test_split(rows):
    return rows.train_test_split(test_size=sources.EVAL_SHARE, seed=sources.EVAL_SEED)["test"]


def _from_hub(name: str) -> list[Example]:
    """The leaderboard's `load_data`, with `datasets`' own split on the hub rows."""
    if name == "fpb":
        rows = _test_split(_load_dataset("takala/financial_phrasebank", "sentences_50agree",
                                         split="train"))
        return [Example(NEWS_INSTRUCTION, r["sentence"], LABELS[r["label"]]) for r in rows]
    if name == "fiqa":
        from datasets import concatenate_datasets

        parts = _load_dataset("pauri32/fiqa-2018")
        rows = _test_split(concatenate_datasets([parts["train"], parts["validation"],
                                                 parts["test"]]))
        return [Example(TWEET_INSTRUCTION if r["format"] == "post" else NEWS_INSTRUCTION,
                        r["sentence"], sources.fiqa_label(float(r["sentiment_score"])))
                for r in rows]
    rows = _load_dataset("zeroshot/twitter-financial-news-sentiment", split="validation")
    return [Example(TWEET_INSTRUCTION, r["text"], sources.TFNS_LABELS[str(r["label"])])
            for r in rows]


def leaderboard_prompt(data: dict) -> str:
    """The leaderboard's `format_example` (an empty input drops the Input line)."""
    context = f"Instruction: {data['instruction']}\n"
    if data["input"]:
        context += f"Input: {data['input']}\n"
    return context + "Answer: "


def answer_window(decoded: str) -> str:
    """What the leaderboard parses: the text between the first and second "Answer: " of the
    decoded prompt + generation (the rest of the output, and any later "Answer: ", is lost);
    "None" when there is no "Answer: " at all."""
    parts = decoded.split("Answer: ")
    return parts[1] if len(parts) > 1 else "None"


def change_target(text: str) -> str:
    """The leaderboard's label mapping, for outputs and gold alike: any "positive" wins (so an
    echoed `{negative/neutral/positive}` counts as positive), then any "negative"; everything
    else, "None" and empty output included, is neutral."""
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"


def run_protocol(protocol: str, name: str, model, tokenizer, items: list[Item],
                 options: Options) -> list[Record]:
    if protocol == "leaderboard":
        return run_leaderboard(model, tokenizer, items, options)
    if protocol == "robust":
        return run_robust(model, tokenizer, items, options)
    raise ValueError(f"unknown protocol {protocol!r}; valid: leaderboard, robust")


def _leaderboard_tokenizer(tokenizer):
    """The tokenizer as the leaderboard gets it: freshly loaded from the model's files. Ours
    (`load_tokenizer`) may have swapped a pad == eos for another existing token, which would
    skip the `[PAD]` quirk; and the fresh copy takes the `[PAD]` without touching the caller's."""
    from transformers import AutoTokenizer

    if not tokenizer.name_or_path:
        raise ValueError("the leaderboard protocol reloads the tokenizer from its folder or hub "
                         "id, and this tokenizer has none (name_or_path is empty)")
    return AutoTokenizer.from_pretrained(tokenizer.name_or_path)


@contextmanager
def _leaderboard_pad_token(model, tokenizer) -> Iterator[None]:
    """The leaderboard's set-up: no pad token, or pad == eos, means a new special `[PAD]`
    and `resize_token_embeddings(len(tokenizer))` (random rows, drawn from the seeded stream;
    for a vocabulary padded past the tokenizer, e.g. Qwen2.5, it *shrinks* the matrices).

    The resize changes the shared model in place, so on exit everything it touched is put
    back: the original embedding and LM-head modules, their original Parameter objects and
    tensors (transformers 5 swaps the input embedding's `.data` in place and installs a new
    LM head), the sizes, and the vocabulary size in the config. Later protocols and sets on
    the same loaded model see exactly the model they were given; the tests check this for
    tied and untied embeddings."""
    if tokenizer.pad_token and tokenizer.pad_token_id != tokenizer.eos_token_id:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    modules = [m for m in (inputs, outputs) if m is not None]
    sizes = ("num_embeddings", "padding_idx", "out_features")
    saved = [(m, m.weight, m.weight.data, {k: getattr(m, k) for k in sizes if hasattr(m, k)})
             for m in modules]
    text_config = base.config.get_text_config()
    vocab_size = text_config.vocab_size
    had_attribute = "vocab_size" in vars(base)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    base.resize_token_embeddings(len(tokenizer))
    try:
        yield
    finally:
        for module, parameter, data, attributes in saved:
            parameter.data = data
            module.weight = parameter
            for key, value in attributes.items():
                setattr(module, key, value)
        base.set_input_embeddings(inputs)
        if outputs is not None:
            base.set_output_embeddings(outputs)
        text_config.vocab_size = vocab_size
        if had_attribute:
            base.vocab_size = vocab_size
        else:
            vars(base).pop("vocab_size", None)


def run_leaderboard(model, tokenizer, items: list[Item], options: Options) -> list[Record]:
    """The leaderboard's `inference`: chunks in order, `generate(**tokens, max_length=512,
    eos_token_id=eos)` with nothing else (no pad id, no sampling switch), the full sequence
    decoded and its answer window mapped by `change_target`.

    The seed is set per set (the leaderboard sets it once per process, so its FiQA and TFNS
    streams continue FPB's): a set, or its first N items, then gives the same answers whatever
    ran before. Greedy models are unaffected. An out-of-memory error is not retried at a smaller
    batch (as in the MMLU protocols), because the batch changes the answers: lower
    `leaderboard_batch_size` knowingly instead."""
    batch_size = int(options.extra.get("leaderboard_batch_size", LEADERBOARD_BATCH_SIZE))
    own = _leaderboard_tokenizer(tokenizer)
    prompts = [leaderboard_prompt(item.data) for item in items]
    device = next(model.parameters()).device
    decoded: list[str] = []
    torch.manual_seed(LEADERBOARD_SEED)
    with _leaderboard_pad_token(model, own), torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            tokens = own(chunk, return_tensors="pt", padding=True,
                         max_length=LEADERBOARD_MAX_LENGTH, return_token_type_ids=False)
            generated = model.generate(**tokens.to(device), max_length=LEADERBOARD_MAX_LENGTH,
                                       eos_token_id=own.eos_token_id)
            decoded += [own.decode(row, skip_special_tokens=True) for row in generated]
            if options.progress:
                options.progress(len(chunk))
    records = []
    for item, prompt, text in zip(items, prompts, decoded, strict=True):
        window = answer_window(text)
        parsed, gold = change_target(window), change_target(item.gold)
        records.append(Record(item.benchmark, item.qid, prompt, gold, window, parsed,
                              parsed == gold, {"answer_found": "Answer: " in text}))
    return records


@torch.inference_mode()
def run_robust(model, tokenizer, items: list[Item], options: Options) -> list[Record]:
    """Log-likelihood of " negative"/" neutral"/" positive" after `...Answer:`, encoded as
    lm-evaluation-harness encodes a request; the most likely label (the first of equal
    maxima) is the answer. One forward pass per prompt when each label is one token."""
    contexts = [leaderboard_prompt(item.data).removesuffix(" ") for item in items]
    pairs = [[harness_encode_pair(tokenizer, c, f" {label}") for label in LABELS]
             for c in contexts]
    scores = continuation_scores(model, tokenizer, [p[0][0] for p in pairs],
                                 [[cont for _, cont in p] for p in pairs], options.batch_size,
                                 options.progress)
    records = []
    for item, context, row in zip(items, contexts, scores.tolist(), strict=True):
        parsed = LABELS[max(range(len(LABELS)), key=row.__getitem__)]
        records.append(Record(item.benchmark, item.qid, context, item.gold, None, parsed,
                              parsed == item.gold,
                              {"loglikelihoods": dict(zip(LABELS, row, strict=True))}))
    return records


def summarize_extra(protocol: str, records: list[Record]) -> dict:
    """How the answers spread over the labels (a leaderboard run that says "positive" to
    almost everything shows here), and for the leaderboard how many outputs had no answer
    window at all."""
    predicted = Counter(r.parsed for r in records)
    extra = {"predicted": {label: predicted.get(label, 0) for label in LABELS}}
    if protocol == "leaderboard":
        extra["no_answer_window"] = sum(not r.extra["answer_found"] for r in records)
    return extra
