"""Straightforward one-question-at-a-time implementations of both protocols: `generate` per
question for the leaderboard protocol, one forward pass per answer choice for the log-likelihood
protocol (how lm-evaluation-harness scores a loglikelihood request). They are the yardstick
for the batched versions in `protocols.py`: the tests require identical predictions (and, for
the log-likelihood protocol, the same four log-likelihoods) and `bench/eval_throughput.py`
measures the speed-up over them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evaluation.mmlu import Question
from evaluation.protocols import (
    LETTERS,
    Prediction,
    flowertune_prompt,
    harness_encode_pair,
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
    """lm-evaluation-harness's causal loglikelihood, one request at a time: the model reads
    (context + continuation)[:-1] and the continuation's tokens are scored at the last
    len(continuation) positions."""
    device = next(model.parameters()).device
    predictions = []
    for q in questions:
        scores = []
        for letter in LETTERS:
            context, continuation = harness_encode_pair(tokenizer, logprob_prompt(q),
                                                        f" {letter}")
            ids = torch.tensor([(context + continuation)[:-1]], device=device)
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            tail = logprobs[-len(continuation):]
            scores.append(sum(float(tail[k, token]) for k, token in enumerate(continuation)))
        best = max(range(len(LETTERS)), key=scores.__getitem__)
        predictions.append(Prediction(q, LETTERS[best], best == q.answer,
                                      loglikelihoods=tuple(scores)))
    return predictions
