"""Client data: IID partitions (flwr-datasets), Alpaca or chat-template prompts, tokenisation
with loss masks."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from flowertune_nlp.names import is_local_reference

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def local_data_files(name: str, key: str = "static.dataset.name"
                     ) -> tuple[str, list[str]] | None:
    """For a local file or folder, return (datasets builder, files); None for a hub id. `key`
    names the setting the path came from, for the error message."""
    if not is_local_reference(name):
        return None
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"{key} = {name!r}: this local path does not exist")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS
    )
    builders = {LOCAL_FORMATS.get(p.suffix) for p in files}
    if not files or None in builders or len(builders) != 1:
        raise ValueError(
            f"{key} = {name!r}: expected one .json/.jsonl/.parquet file or a folder "
            f"of files of a single one of those formats, found {[p.name for p in files][:5]}"
        )
    return builders.pop(), [str(p) for p in files]


@functools.lru_cache(maxsize=2)
def federated_dataset(name: str, num_partitions: int, seed: int):
    """One FederatedDataset per process; flwr-datasets caches the loaded partitions in it."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    partitioners = {"train": IidPartitioner(num_partitions=num_partitions)}
    local = local_data_files(name)
    if local is None:
        return FederatedDataset(dataset=name, partitioners=partitioners, seed=seed)
    builder, files = local
    return FederatedDataset(
        dataset=builder, data_files=files, partitioners=partitioners, seed=seed
    )


def load_partition(name: str, num_partitions: int, partition_id: int, seed: int) -> Dataset:
    return federated_dataset(name, num_partitions, seed).load_partition(partition_id, "train")


def load_node_data(path: str) -> Dataset:
    """A node's own alpaca rows (`data-path` in its --node-config); ValueError naming the file
    and the problem when they are missing, unreadable or not alpaca rows."""
    from datasets import load_dataset

    key = "--node-config data-path"
    if not Path(path).expanduser().exists():
        raise ValueError(f"{key} = {path!r} does not exist on this node")
    local = local_data_files(path, key)
    assert local is not None  # the path exists
    builder, files = local
    try:
        rows = load_dataset(builder, data_files=files, split="train")
    except Exception as err:  # datasets raises many types for unreadable files
        raise ValueError(f"{key} = {path!r} cannot be read as {builder}: "
                         f"{type(err).__name__}: {err}") from None
    missing = sorted({"instruction", "output"} - set(rows.column_names))
    if missing:
        raise ValueError(f"{key} = {path!r}: the rows have no {', '.join(missing)} column; "
                         "expected alpaca rows with instruction, input (optional) and output")
    return rows


def format_prompt(instruction: str, context: str | None, keep_input: bool) -> str:
    """Alpaca prompt up to and including the response marker."""
    if keep_input and context and context.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction.strip(), input=context.strip())
    return PROMPT_NO_INPUT.format(instruction=instruction.strip())


@dataclass
class TokenizedPartition:
    """A client's tokenised examples and what was dropped on the way."""

    dataset: Dataset
    dropped_empty: int
    dropped_truncated: int

    @property
    def dropped(self) -> int:
        return self.dropped_empty + self.dropped_truncated


def chat_prompt(tokenizer, instruction: str, context: str | None, keep_input: bool) -> str:
    """The model's own chat template around the instruction (and input), up to the point where
    the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("static.dataset.prompt-template = \"chat\" needs a tokenizer with a "
                         "chat template, and this model's has none; use \"alpaca\"")
    content = instruction.strip()
    if keep_input and context and context.strip():
        content += "\n\n" + context.strip()
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def tokenize_example(tokenizer, prompt: str, response: str, max_length: int,
                     add_special_tokens: bool = True) -> dict | None:
    """input_ids = prompt + response + EOS, truncated to max_length; completion_mask marks the
    tokens that carry loss (response and EOS). None when truncation leaves no response token,
    which would otherwise train with zero loss. A chat-template prompt already holds its special
    tokens, so it is encoded without adding more."""
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = [*response_ids, tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        return None
    input_ids = (prompt_ids + response_ids)[:max_length]
    completion_mask = [0] * len(prompt_ids) + [1] * (len(input_ids) - len(prompt_ids))
    return {"input_ids": input_ids, "completion_mask": completion_mask}


def tokenize_partition(
    rows: Dataset, tokenizer, max_length: int, keep_input: bool, template: str = "alpaca"
) -> TokenizedPartition:
    examples: list[dict] = []
    dropped_empty = dropped_truncated = 0
    for row in rows:
        instruction, output = row.get("instruction"), row.get("output")
        if not isinstance(instruction, str) or not instruction.strip() or not isinstance(
            output, str
        ) or not output.strip():
            dropped_empty += 1
            continue
        if template == "chat":
            prompt = chat_prompt(tokenizer, instruction, row.get("input"), keep_input)
        else:
            prompt = format_prompt(instruction, row.get("input"), keep_input)
        example = tokenize_example(tokenizer, prompt, output.strip(), max_length,
                                   add_special_tokens=template != "chat")
        if example is None:
            dropped_truncated += 1
            continue
        examples.append(example)
    if dropped_empty or dropped_truncated:
        log.info(
            "dropped %d rows with empty instruction/output and %d whose response was "
            "truncated away at length %d", dropped_empty, dropped_truncated, max_length
        )
    if not examples:
        raise ValueError(
            f"no trainable examples left in this partition ({dropped_empty} empty, "
            f"{dropped_truncated} truncated at train.seq-length = {max_length})"
        )
    return TokenizedPartition(Dataset.from_list(examples), dropped_empty, dropped_truncated)


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed that differs per round and per client, so no client re-sees the same first
    samples every round (a defect of the published baseline) and runs stay reproducible."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**32)


def examples_for_round(
    partition: TokenizedPartition, needed: int, seed: int, server_round: int, partition_id: int
) -> Dataset:
    """The round's examples: the partition shuffled with the round's seed, cut to what the
    configured steps consume (repeated when the partition is smaller)."""
    shuffled = partition.dataset.shuffle(seed=round_seed(seed, server_round, partition_id))
    if len(shuffled) >= needed:
        return shuffled.select(range(needed))
    repeats = -(-needed // len(shuffled))
    indices = [i % len(shuffled) for i in range(repeats * len(shuffled))][:needed]
    return shuffled.select(indices)
