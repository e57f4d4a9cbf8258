"""Plain-completion code generation: the harness's sampled decoding (leaderboard) and batched
greedy or multi-sample decoding (robust), each cut where its stop strings begin."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; `temperature=None` is greedy."""

    temperature: float | None = None
    top_p: float = 0.95
    top_k: int = 0  # 0: no top-k filter, as the harness passes it

    def kwargs(self) -> dict:
        if self.temperature is None:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k}


LEADERBOARD_SAMPLING = Sampling(temperature=0.2, top_p=0.95, top_k=0)
LEADERBOARD_SEQUENCES = 4  # the harness's --batch_size: samples drawn together per prompt


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (the harness's
    `_stop_at_stop_token`)."""
    end = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            end = min(end, index)
    return text[:end]


def with_eos(stops: Sequence[str], tokenizer) -> list[str]:
    """The harness appends the tokenizer's EOS string to the task's stop words."""
    return [*stops, tokenizer.eos_token] if tokenizer.eos_token else list(stops)


class StopStrings(StoppingCriteria):
    """Ends rows whose generated text (after `start`) holds a stop string or has used its token
    budget. `together=True` is the harness's EndOfFunctionCriteria: nothing ends until every row
    is done, so all rows keep drawing from the random stream until then.

    The harness decodes each row's whole generation at every step (quadratic in its length).
    Checked at every step, a stop string first appears within the newest tokens: it is at most
    `len(stop.encode())` tokens long (one byte or more per token), so decoding a window of that
    many tokens plus two (a SentencePiece window start may drop a leading space) finds it at the
    same step."""

    def __init__(self, tokenizer, start: int, stops: Sequence[str], budgets: Sequence[int],
                 together: bool):
        self.tokenizer, self.start, self.stops = tokenizer, start, list(stops)
        self.budgets, self.together = list(budgets), together
        self.window = max((len(s.encode()) for s in self.stops), default=0) + 2
        self.done: list[bool] = [False] * len(budgets)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        generated = input_ids.shape[1] - self.start
        pending = [i for i, done in enumerate(self.done) if not done]
        tail = max(self.start, input_ids.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(input_ids[pending, tail:])
        for i, text in zip(pending, texts, strict=True):
            self.done[i] = generated >= self.budgets[i] or any(s in text for s in self.stops)
        if self.together:
            return torch.full((len(self.done),), all(self.done), device=input_ids.device)
        return torch.tensor(self.done, device=input_ids.device)


def _generate(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, sampling: Sampling,
              criterion: StopStrings, max_new_tokens: int, sequences: int = 1) -> torch.Tensor:
    return model.generate(
        input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
        max_new_tokens=max_new_tokens, num_return_sequences=sequences,
        stopping_criteria=StoppingCriteriaList([criterion]), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, use_cache=True, **sampling.kwargs(),
    )


@torch.inference_mode()
def harness_completion(model, tokenizer, prompt: str, stops: Sequence[str],
                       max_length: int) -> str:
    """The harness's generation for one prompt: 4 sequences sampled together
    (temperature 0.2, top-p 0.95), stopped when all 4 hold a stop string or at `max_length`
    tokens (prompt included); the first is kept, decoded with special tokens (BOS dropped) and
    sliced at `len(prompt)`. Returns that text before the stop-word cut. Seeding is the
    caller's (once per benchmark, as the harness does per task)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] >= max_length:  # the harness keeps the prompt as the whole generation
        return ""
    stops = with_eos(stops, tokenizer)
    budget = max_length - ids.shape[1]
    criterion = StopStrings(tokenizer, ids.shape[1], stops, [budget] * LEADERBOARD_SEQUENCES,
                            together=True)
    out = _generate(model, tokenizer, ids, torch.ones_like(ids), LEADERBOARD_SAMPLING, criterion,
                    budget, LEADERBOARD_SEQUENCES)
    first = out[0].tolist()
    if tokenizer.bos_token_id is not None and first[0] == tokenizer.bos_token_id:
        first = first[1:]
    text = tokenizer.decode(first, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text[len(prompt):]


def _unpadded(tokens: list[int], pad: int) -> list[int]:
    """Drop the padding `generate` appends to a row that finished before the others."""
    end = len(tokens)
    while end and tokens[end - 1] == pad:
        end -= 1
    return tokens[:end]


@torch.inference_mode()
def completions(model, tokenizer, prompts: Sequence[str], stops: Sequence[str], max_length: int,
                batch_size: int, sampling: Sampling = Sampling(), samples: int = 1,
                progress: Callable[[int], None] | None = None) -> list[list[str]]:
    """`samples` raw completions per prompt (cut them with `cut_at_stop`), each the decoded new
    tokens only (no reliance on decode(encode(prompt)) == prompt), special tokens kept so the
    EOS string can act as a stop word, each row stopped on its own. Greedy (`samples=1`)
    batches prompts longest first with left padding; every row keeps its own budget of
    `max_length` - its prompt length. Sampling draws up to `batch_size` sequences of one prompt
    per call."""
    stops = with_eos(stops, tokenizer)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    results: list[list[str]] = [[] for _ in prompts]

    def run(rows: list[int], sequences: int) -> list[str]:
        budgets = [max(0, max_length - len(encoded[i])) for i in rows]
        if max(budgets) == 0:
            return [""] * (len(rows) * sequences)
        width = max(len(encoded[i]) for i in rows)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(encoded[i])) + encoded[i]
                            for i in rows])
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i])
                             for i in rows])
        row_budgets = [b for b in budgets for _ in range(sequences)]
        criterion = StopStrings(tokenizer, width, stops, row_budgets, together=False)
        out = _generate(model, tokenizer, ids, mask, sampling, criterion, max(budgets),
                        sequences)[:, width:].tolist()
        return [tokenizer.decode(_unpadded(tokens[:budget], tokenizer.pad_token_id),
                                 skip_special_tokens=False, clean_up_tokenization_spaces=False)
                for tokens, budget in zip(out, row_budgets, strict=True)]

    if samples == 1:
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for i, text in zip(batch, run(batch, 1), strict=True):
                results[i].append(text)
            if progress:
                progress(len(batch))
        return results
    for i in range(len(prompts)):
        while len(results[i]) < samples:
            results[i] += run([i], min(batch_size, samples - len(results[i])))
        if progress:
            progress(1)
    return results
