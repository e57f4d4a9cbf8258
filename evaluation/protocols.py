"""The two ways we score MMLU.

flowertune: the FlowerTune leaderboard's zero-shot generation protocol, reproduced exactly so our
numbers sit in its table. It reads one generated token, so it measures format compliance as much
as knowledge.

logprob: lm-evaluation-harness's MMLU protocol: the choice whose continuation " A".." D" is most
likely. One forward pass per question; nothing can fail to parse. Prompts and continuations are
tokenised exactly as the harness's `HFLM` does (`harness_encode_pair`), BOS rule included.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from evaluation.mmlu import LETTERS, Question

log = logging.getLogger(__name__)

FLOWERTUNE_INSTRUCTION = "Answer the following multiple choice question."
VALID_OUTPUTS = ("a", "b", "c", "d", "e", "yes", "no")


@dataclass
class Prediction:
    question: Question
    prediction: str | None  # "A".."D", or None when the output is not a letter A-D
    correct: bool
    raw_output: str | None = None
    # logprob: the log-likelihood of each choice's continuation " A".." D", in that order.
    loglikelihoods: tuple[float, ...] | None = None


# ----------------------------------------------------------------------------- flowertune


def flowertune_example(question: str, choices: Sequence[str]) -> str:
    """FlowerTune's `format_example` (general NLP and medical): "?" is appended unless the
    question ends in "?" or "." (so `…"` becomes `…"?`)."""
    if not question.endswith(("?", ".")):
        question += "?"
    options = "\n".join(f"{chr(65 + i)}. {choice}" for i, choice in enumerate(choices))
    return f"Question: {question}\n\nOptions:\n{options}"


def flowertune_wrap(prompt: str) -> str:
    """The leaderboard's literal pseudo-ChatML wrapper (not the model's chat template)."""
    return f"<|im_start|>question\n{prompt}<|im_end|>\n<|im_start|>answer\n"


def flowertune_prompt(q: Question) -> str:
    example = flowertune_example(q.question, q.choices)
    return flowertune_wrap(f"{FLOWERTUNE_INSTRUCTION}\n{example}\nThe answer is:\n")


def flowertune_answer(output: str, gold: str, boolean: bool = False) -> tuple[str | None, bool]:
    """FlowerTune's `format_answer` + accuracy (medical and general-NLP utils.py): returns (the
    parsed answer, one of VALID_OUTPUTS, or None; correct). Lowercased; the line after a "\\n##"
    marker if any; non-alphanumerics become single spaces; multiple choice keeps the first
    character ("Answer: C" reads as "a"), boolean repairs yesyes/nono/yesno/noyes and keeps the
    whole string. An answer outside VALID_OUTPUTS falls back to comparing the whole raw
    lowercased output with the gold, so "maybe" only counts when the output is exactly that."""
    output, gold = output.lower(), gold.lower()
    text = output.split("\n##")[1].split("\n")[0].strip() if "\n##" in output else output
    text = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", text).strip())
    if boolean:
        for doubled, single in (("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"),
                                ("noyes", "no")):
            if doubled in text:  # only the first pattern found is repaired
                text = text.replace(doubled, single)
                break
    text = text.encode("ascii", "ignore").decode("ascii")
    if not boolean:
        text = text[:1]
    if text not in VALID_OUTPUTS:
        return None, output == gold
    return text, text == gold


def parse_flowertune(output: str, gold_letter: str) -> tuple[str | None, bool]:
    """The leaderboard's answer parsing: returns (predicted letter A-D or None, correct)."""
    answer, correct = flowertune_answer(output, gold_letter)
    return (answer.upper() if answer in ("a", "b", "c", "d") else None), correct


def _longest_first(lengths: list[int]) -> list[int]:
    """Indices by decreasing length: each batch pads little, and the batch that needs the most
    memory runs first, so an out-of-memory error comes at the start, not after hours of work."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _in_batches(order: list[int], batch_size: int, run: Callable[[list[int]], None]) -> None:
    """Call `run` on consecutive batches of `order`. On CUDA out-of-memory the batch size
    halves and the batch runs again; batches come longest first, so later ones fit too."""
    start = 0
    while start < len(order):
        batch = order[start:start + batch_size]
        try:
            run(batch)
            start += len(batch)
            continue
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
        # Out of the except block, the traceback and the tensors its frames held are gone.
        batch_size //= 2
        log.warning("CUDA out of memory: evaluation batch size now %d", batch_size)
        torch.cuda.empty_cache()


def _left_padded(rows: list[list[int]], pad: int, device) -> dict[str, torch.Tensor]:
    """A left-padded batch whose position ids count real tokens only, so every real token sits
    at the position it has when the prompt runs alone (what `generate` does internally)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device)}


def _next_token_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the token after each (left-padded) prompt. Only the last position goes
    through the LM head: over a 49k vocabulary the full [batch, length, vocab] logits would
    cost a fifth of the forward pass and hundreds of MB."""
    return model(**batch, logits_to_keep=1).logits[:, -1, :]


@torch.inference_mode()
def run_flowertune(model, tokenizer, questions: Sequence[Question], batch_size: int,
                   progress: Callable | None = None) -> list[Prediction]:
    """Greedy generation of as many tokens as the gold letter has, batched with left padding.
    For one-token answers (every MMLU letter) greedy generation is the argmax of the next-token
    logits, which one forward pass gives without `generate`'s per-call set-up."""
    device = next(model.parameters()).device
    encoded = [tokenizer(flowertune_prompt(q))["input_ids"] for q in questions]
    new_tokens = [len(tokenizer(q.gold_letter, add_special_tokens=False)["input_ids"])
                  for q in questions]
    outputs: list[str | None] = [None] * len(questions)
    pad = tokenizer.pad_token_id

    def run(batch: list[int]) -> None:
        inputs = _left_padded([encoded[i] for i in batch], pad, device)
        steps = max(new_tokens[i] for i in batch)
        if steps == 1:
            generated = _next_token_logits(model, inputs).argmax(-1, keepdim=True)
        else:
            width = inputs["input_ids"].shape[1]
            generated = model.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                max_new_tokens=steps, do_sample=False, pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )[:, width:]
        tokens = generated.tolist()  # one device-to-host copy per batch, not one per row
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(tokens[row][:new_tokens[i]], skip_special_tokens=True)
        if progress:
            progress(len(batch))

    _in_batches(_longest_first([len(e) for e in encoded]), batch_size, run)
    predictions = []
    for q, text in zip(questions, outputs, strict=True):
        letter, correct = parse_flowertune(text, q.gold_letter)
        predictions.append(Prediction(q, letter, correct, text))
    return predictions


# ----------------------------------------------------------------------------- logprob


def _logprob_block(q: Question) -> str:
    options = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(q.choices))
    return f"{q.question.strip()}{options}\nAnswer:"


def logprob_prompt(q: Question, shots: Sequence[Question] = ()) -> str:
    header = ("The following are multiple choice questions (with answers) about "
              f"{q.subject.replace('_', ' ')}.\n\n")
    examples = "".join(f"{_logprob_block(s)} {s.gold_letter}\n\n" for s in shots)
    return header + examples + _logprob_block(q)


def harness_encode(tokenizer, text: str) -> list[int]:
    """`HFLM.tok_encode(text)` of lm-evaluation-harness 0.4.9.2+ with its defaults
    (`add_bos_token` unset): the tokenizer's own special tokens (so Gemma's `<bos>`, Llama 3's
    `<|begin_of_text|>`; none for SmolLM2 or Qwen2.5), unless the text already starts with the
    BOS string (the EOS string for a tokenizer without BOS), which is then not added twice."""
    prefix = tokenizer.bos_token_id
    if prefix is None:
        prefix = tokenizer.eos_token_id
    add_special_tokens = prefix is None or not text.startswith(tokenizer.decode(prefix))
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def harness_encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """`LM._encode_pair` of lm-evaluation-harness (causal models): trailing spaces of the context
    move to the continuation; context + continuation is encoded whole and the continuation's
    tokens are what follows the separately encoded context's length."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = harness_encode(tokenizer, context + continuation)
    context_ids = harness_encode(tokenizer, context)
    continuation_ids = whole[len(context_ids):]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after the context")
    return context_ids, continuation_ids


def encode_logprob(tokenizer, questions: Sequence[Question],
                   shots: dict[str, list[Question]] | None = None):
    """Each question's context tokens and the tokens of its four continuations " A".." D",
    as lm-evaluation-harness builds its loglikelihood requests (`harness_encode_pair`)."""
    prompts, continuations = [], []
    for q in questions:
        context = logprob_prompt(q, (shots or {}).get(q.subject, ()))
        pairs = [harness_encode_pair(tokenizer, context, f" {letter}") for letter in LETTERS]
        prompts.append(pairs[0][0])  # the context's encoding does not depend on the choice
        continuations.append([cont for _, cont in pairs])
    return prompts, continuations


@torch.inference_mode()
def run_logprob(model, tokenizer, questions: Sequence[Question], batch_size: int,
                shots: dict[str, list[Question]] | None = None,
                progress: Callable | None = None) -> list[Prediction]:
    """Score " A".." D" as continuations of the prompt. When each is a single token (all
    tokenizers we use), one forward pass per prompt scores all four from its next-token
    distribution; otherwise each prompt + continuation runs, right-padded."""
    prompts, continuations = encode_logprob(tokenizer, questions, shots)
    scores = continuation_scores(model, tokenizer, prompts, continuations, batch_size, progress)
    predictions = []
    for qi, q in enumerate(questions):
        best = int(torch.argmax(scores[qi]))  # the first of equal maxima, as numpy's argmax
        predictions.append(Prediction(q, LETTERS[best], best == q.answer,
                                      loglikelihoods=tuple(scores[qi].tolist())))
    return predictions


@torch.inference_mode()
def continuation_scores(model, tokenizer, prompts: list[list[int]],
                        continuations: list[list[list[int]]], batch_size: int,
                        progress: Callable | None = None) -> torch.Tensor:
    """Log-likelihood of each continuation after its prompt: `continuations[q][c]` are the
    tokens of choice c of prompt q (every prompt has the same number of choices); returns a
    [prompts, choices] tensor. When every continuation is one token, one forward pass per prompt
    scores all its choices from the next-token distribution (the prompt's pass is shared);
    otherwise each prompt + continuation runs, right-padded. Without autograd: the scores of a
    model whose weights require gradients would otherwise keep every batch's activations."""
    device = next(model.parameters()).device
    if all(len(c) == 1 for conts in continuations for c in conts):
        return _score_next_token(model, tokenizer, prompts,
                                 [[c[0] for c in conts] for conts in continuations],
                                 batch_size, device, progress)
    return _score_continuations(model, tokenizer, prompts, continuations, batch_size, device,
                                progress)


def _score_next_token(model, tokenizer, prompts, letter_ids, batch_size, device, progress):
    """`letter_ids[q]`: the one token of each continuation of question q."""
    letter_ids = torch.tensor(letter_ids)
    scores = torch.empty(letter_ids.shape)

    def run(batch: list[int]) -> None:
        inputs = _left_padded([prompts[i] for i in batch], tokenizer.pad_token_id, device)
        logprobs = torch.log_softmax(_next_token_logits(model, inputs).float(), dim=-1)
        scores[batch] = logprobs.gather(1, letter_ids[batch].to(device)).cpu()
        if progress:
            progress(len(batch))

    _in_batches(_longest_first([len(p) for p in prompts]), batch_size, run)
    return scores


def _score_continuations(model, tokenizer, prompts, continuations, batch_size, device,
                         progress):
    """Sum of each continuation's token log-probabilities (`continuations[q][c]`: the tokens of
    choice c of question q); right padding keeps every real token's position and attention
    exactly as in an unbatched pass."""
    sequences = [(qi, c, ids + cont) for qi, ids in enumerate(prompts)
                 for c, cont in enumerate(continuations[qi])]
    scores = torch.full((len(prompts), len(continuations[0])), float("-inf"))
    pending = [len(conts) for conts in continuations]  # choices not yet scored, per prompt
    pad = tokenizer.pad_token_id

    def run(batch: list[int]) -> None:
        width = max(len(sequences[s][2]) for s in batch)
        ids = torch.tensor([sequences[s][2] + [pad] * (width - len(sequences[s][2]))
                            for s in batch])
        mask = torch.tensor([[1] * len(sequences[s][2]) + [0] * (width - len(sequences[s][2]))
                             for s in batch])
        rows, positions, tokens = [], [], []
        for row, s in enumerate(batch):
            qi, choice, _ = sequences[s]
            start, cont = len(prompts[qi]), continuations[qi][choice]
            rows += [row] * len(cont)
            positions += range(start - 1, start - 1 + len(cont))
            tokens += cont
        # Only the positions that predict a continuation token go through the LM head: the
        # full [batch, length, vocab] logits of 16 PubMedQA abstracts over a 49k vocabulary
        # take over 20 GB in fp32.
        keep = sorted(set(positions))
        column = {position: i for i, position in enumerate(keep)}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       logits_to_keep=torch.tensor(keep, device=device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        # Each continuation token's log-probability, picked on the device: one small copy back.
        picked = logprobs[rows, [column[p] for p in positions], tokens].cpu().split(
            [len(continuations[sequences[s][0]][sequences[s][1]]) for s in batch])
        for s, values in zip(batch, picked, strict=True):
            qi, choice, _ = sequences[s]
            scores[qi, choice] = values.sum()
            pending[qi] -= 1
        # A prompt's choices can fall into different batches: it is done with its last one.
        if progress:
            progress(len({sequences[s][0] for s in batch if pending[sequences[s][0]] == 0}))

    _in_batches(_longest_first([len(s[2]) for s in sequences]), batch_size, run)
    return scores
