"""The two ways we score MMLU.

flowertune: the FlowerTune leaderboard's zero-shot generation protocol, reproduced exactly so our
numbers sit in its table. It reads one generated token, so it measures format compliance as much
as knowledge.

logprob: lm-evaluation-harness's MMLU protocol: the choice whose continuation " A".." D" is most
likely. One forward pass per question; nothing can fail to parse.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from evaluation.mmlu import LETTERS, Question

FLOWERTUNE_INSTRUCTION = "Answer the following multiple choice question."
VALID_OUTPUTS = ("a", "b", "c", "d", "e", "yes", "no")


@dataclass
class Prediction:
    question: Question
    prediction: str | None  # "A".."D", or None when the output is not a letter A-D
    correct: bool
    raw_output: str | None = None


# ----------------------------------------------------------------------------- flowertune


def flowertune_prompt(q: Question) -> str:
    text = q.question
    if not text.endswith(("?", ".")):
        text += "?"
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(q.choices))
    block = f"{FLOWERTUNE_INSTRUCTION}\nQuestion: {text}\n\nOptions:\n{options}\nThe answer is:\n"
    return f"<|im_start|>question\n{block}<|im_end|>\n<|im_start|>answer\n"


def parse_flowertune(output: str, gold_letter: str) -> tuple[str | None, bool]:
    """The leaderboard's answer parsing: returns (predicted letter A-D or None, correct)."""
    output, gold = output.lower(), gold_letter.lower()
    if "\n##" in output:
        output = output.split("\n##")[1].split("\n")[0].strip().lower()
    cleaned = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", output).strip())
    cleaned = cleaned.encode("ascii", "ignore").decode("ascii")
    first = cleaned[:1]  # multiple-choice answers are cut to their first character
    if first not in VALID_OUTPUTS:
        # The leaderboard compares the whole raw output with the letter: almost always wrong.
        return None, output == gold
    return (first.upper() if first in "abcd" else None), first == gold


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _by_length(prompts: list[list[int]]) -> list[int]:
    """Indices sorted by prompt length, so each batch pads little."""
    return sorted(range(len(prompts)), key=lambda i: len(prompts[i]))


@torch.inference_mode()
def run_flowertune(model, tokenizer, questions: Sequence[Question], batch_size: int,
                   progress: Callable | None = None) -> list[Prediction]:
    """Greedy generation of as many tokens as the gold letter has, batched with left padding."""
    device = next(model.parameters()).device
    encoded = [tokenizer(flowertune_prompt(q))["input_ids"] for q in questions]
    new_tokens = [len(tokenizer(q.gold_letter, add_special_tokens=False)["input_ids"])
                  for q in questions]
    outputs: list[str | None] = [None] * len(questions)
    order = _by_length(encoded)
    for batch in _batches(order, batch_size):
        width = max(len(encoded[i]) for i in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in batch])
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i])
                             for i in batch])
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=max(new_tokens[i] for i in batch), do_sample=False,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(batch):
            tokens = generated[row, width:width + new_tokens[i]]
            outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        if progress:
            progress(len(batch))
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


@torch.inference_mode()
def run_logprob(model, tokenizer, questions: Sequence[Question], batch_size: int,
                shots: dict[str, list[Question]] | None = None,
                progress: Callable | None = None) -> list[Prediction]:
    """Score " A".." D" as continuations of the prompt; right padding keeps every real token's
    position and attention exactly as in an unbatched pass."""
    device = next(model.parameters()).device
    prompts = [tokenizer(logprob_prompt(q, (shots or {}).get(q.subject, ())),
                         add_special_tokens=False)["input_ids"] for q in questions]
    continuations = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
                     for letter in LETTERS]
    single_token = all(len(c) == 1 for c in continuations)
    # Sequences to run: the prompt alone when each continuation is one token (its next-token
    # distribution scores all four), else prompt + continuation for each choice.
    sequences: list[tuple[int, int, list[int]]] = []  # (question, choice or -1, ids)
    for qi, ids in enumerate(prompts):
        if single_token:
            sequences.append((qi, -1, ids))
        else:
            sequences += [(qi, c, ids + cont) for c, cont in enumerate(continuations)]
    scores = torch.full((len(questions), 4), float("-inf"))
    order = sorted(range(len(sequences)), key=lambda s: len(sequences[s][2]))
    for batch in _batches(order, batch_size):
        width = max(len(sequences[s][2]) for s in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([sequences[s][2] + [pad] * (width - len(sequences[s][2]))
                            for s in batch])
        mask = torch.tensor([[1] * len(sequences[s][2]) + [0] * (width - len(sequences[s][2]))
                             for s in batch])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, s in enumerate(batch):
            qi, choice, seq = sequences[s]
            if choice < 0:
                last = len(seq) - 1
                scores[qi] = logprobs[row, last, [c[0] for c in continuations]]
            else:
                start = len(prompts[qi])
                cont = continuations[choice]
                positions = range(start - 1, start - 1 + len(cont))
                scores[qi, choice] = sum(logprobs[row, p, t] for p, t in zip(positions, cont,
                                                                              strict=True))
        if progress:
            progress(len({sequences[s][0] for s in batch}))
    predictions = []
    for qi, q in enumerate(questions):
        best = int(torch.argmax(scores[qi]))
        predictions.append(Prediction(q, LETTERS[best], best == q.answer))
    return predictions
