"""Straightforward one-question-at-a-time implementations of both protocols: `generate` per
question for the leaderboard protocol, one forward pass per answer choice for the log-likelihood
protocol (how lm-evaluation-harness scores a loglikelihood request). They are the yardstick
for the batched versions in `protocols.py`: the tests require identical predictions and
`bench/eval_throughput.py` measures the speed-up over them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evaluation.mmlu import Question
from evaluation.protocols import (
    LETTERS,
    Prediction,
    flowertune_prompt,
    logprob_prompt,
    parse_flowertune,
)


@torch.inference_mode()
def reference_flowertune(model, tokenizer, questions: Sequence[Question]) -> list[Prediction]:
    device = next(model.parameters()).device
    predictions = []
    for q in questions:
        inputs = tokenizer(flowertune_prompt(q), return_tensors="pt").to(device)
        new = len(tokenizer(q.gold_letter, add_special_tokens=False)["input_ids"])
        generated = model.generate(**inputs, max_new_tokens=new, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:],
                                skip_special_tokens=True)
        letter, correct = parse_flowertune(text, q.gold_letter)
        predictions.append(Prediction(q, letter, correct, text))
    return predictions


@torch.inference_mode()
def reference_logprob(model, tokenizer, questions: Sequence[Question]) -> list[Prediction]:
    device = next(model.parameters()).device
    predictions = []
    for q in questions:
        prompt = tokenizer(logprob_prompt(q), add_special_tokens=False)["input_ids"]
        scores = []
        for letter in LETTERS:
            continuation = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + continuation], device=device)
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            scores.append(sum(float(logprobs[len(prompt) - 1 + k, token])
                              for k, token in enumerate(continuation)))
        best = max(range(len(LETTERS)), key=scores.__getitem__)
        predictions.append(Prediction(q, LETTERS[best], best == q.answer))
    return predictions
