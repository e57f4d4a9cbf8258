"""Client data: partitions (flwr-datasets' partitioners: IID, Dirichlet or pathological label
skew, exponential or linear size skew), a held-out validation split, a node's own data, Alpaca
or chat-template prompts, tokenisation with loss masks."""

from __future__ import annotations

import functools
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from datasets import Dataset, DatasetDict

from flowertune_nlp.config import AppConfig, ConfigError, DatasetSettings
from flowertune_nlp.names import is_local_reference
from flowertune_nlp.tasks import DEFAULT_TASK, get_task

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


# The derived label: a task type read off the instruction (see `task_type`).
DERIVED_LABEL = "task_type"
HELD_OUT_SPLIT = "flowertune_heldout"
LABEL_PARTITIONERS = ("dirichlet", "pathological")

TASK_KEYWORDS: dict[str, tuple[str, ...]] = {
    "question": ("what", "which", "who", "whom", "whose", "when", "where", "why", "how", "is",
                 "are", "was", "were", "can", "could", "do", "does", "did", "would", "should",
                 "will"),
    "explain": ("explain", "describe", "define", "discuss", "compare", "contrast", "analyze",
                "analyse", "evaluate", "outline", "elaborate", "clarify", "tell", "state",
                "interpret", "justify", "argue", "reflect", "speculate", "critique", "review",
                "assess", "differentiate", "specify"),
    "creative": ("write", "compose", "create", "generate", "design", "invent", "imagine",
                 "brainstorm", "come", "construct", "develop", "make", "craft", "devise",
                 "formulate", "propose", "suggest", "build", "produce", "draft", "plan",
                 "pretend", "think", "synthesize"),
    "rewrite": ("rewrite", "re-write", "edit", "paraphrase", "reword", "rephrase", "change",
                "correct", "proofread", "improve", "convert", "transform", "translate",
                "summarize", "summarise", "shorten", "simplify", "replace", "rearrange",
                "reorganize", "reorder", "re-order", "fill", "insert", "add", "delete", "remove",
                "substitute", "reverse", "complete", "adapt", "alter", "format", "combine",
                "merge", "expand", "cut", "modify", "turn", "organize"),
    "classify": ("classify", "categorize", "categorise", "identify", "determine", "detect",
                 "decide", "choose", "select", "pick", "rank", "sort", "assign", "label",
                 "predict", "find", "match", "indicate", "recognize", "recognise", "spot",
                 "extract", "verify", "validate", "check", "distinguish", "group", "order",
                 "arrange", "search"),
    "list": ("list", "name", "give", "provide", "enumerate", "recommend", "offer", "share",
             "recall", "cite", "mention"),
    "math": ("calculate", "compute", "solve", "sum", "multiply", "divide", "subtract", "count",
             "estimate", "resolve", "deduce", "derive"),
}
TASK_BY_KEYWORD = {word: task for task, words in TASK_KEYWORDS.items() for word in words}
CODE_WORDS = re.compile(r"\b(code|program|programs|function|algorithm|sql|python|java|"
                        r"javascript|c\+\+|html|css|regex|regular expression|array|for loop)\b")
LEAD_INS = ("given", "based", "using", "from", "in", "for", "with", "after", "considering",
            "according")
_WORD = re.compile(r"[a-z][a-z'-]*")
TASK_TYPES = ("code", *TASK_KEYWORDS, "other")


def task_type(instruction: str) -> str:
    """The task type of an alpaca instruction, the label `dirichlet` and `pathological`
    partition by when `static.dataset.partition-by` is empty. Alpaca rows carry no label; this
    one says what kind of work the instruction asks for, by a fixed rule:

    1. `code` if the instruction (lower-cased) mentions code: one of the words code, program(s),
       function, algorithm, sql, python, java, javascript, c++, html, css, regex, array, the
       phrases "regular expression" or "for loop";
    2. otherwise, if it opens with a lead-in clause ("Given a sentence, rewrite it", one of
       `LEAD_INS` as first word and a comma after it), the words after the first comma;
    3. the task of the first of its first 12 words found in `TASK_KEYWORDS`: `question` (what,
       how, is, can, ...), `explain` (explain, describe, compare, ...), `creative` (write,
       generate, create, design, suggest, ...), `rewrite` (rewrite, edit, summarize, translate,
       convert, ...), `classify` (classify, identify, determine, find, choose, ...), `list`
       (list, name, give, provide, ...), `math` (calculate, compute, solve, ...);
    4. `other` when none is found.

    On the 1,000-row alpaca-gpt4 sample: creative 321, explain 152, classify 142, rewrite 127,
    question 92, list 82, code 48, math 24, other 12 (`partition_report` gives a run's counts).
    """
    text = instruction.lower()
    if CODE_WORDS.search(text):
        return "code"
    words = _WORD.findall(text)
    if words and words[0] in LEAD_INS and "," in text:
        words = _WORD.findall(text.split(",", 1)[1]) or words
    for word in words[:12]:
        if word in TASK_BY_KEYWORD:
            return TASK_BY_KEYWORD[word]
    return "other"


def _problem(key: str, value, problem: str) -> ConfigError:
    return ConfigError(f"run config key '{key}' = {value!r} is invalid: {problem}")


def validation_count(size: float, rows: int) -> int:
    """The number of rows `static.dataset.validation-size` holds out of `rows`: a whole number
    >= 1 is a row count, a number in (0, 1) a fraction (rounded to the nearest row), 0 none.
    ConfigError when that leaves no validation row or no training row."""
    key = "static.dataset.validation-size"
    if size == 0:
        return 0
    size = int(size) if float(size).is_integer() else size  # name 100 as written, not 100.0
    count = int(size) if size >= 1 else round(size * rows)
    if count < 1:
        raise _problem(key, size, f"a fraction {size} of the {rows} rows is no row; give a "
                                  f"larger fraction or a row count >= 1")
    if count >= rows:
        raise _problem(key, size, f"it holds out {count} of the dataset's {rows} rows and leaves "
                                  f"no training rows; give fewer than {rows} rows or a "
                                  f"fraction < 1")
    return count


def label_column(settings: DatasetSettings) -> str:
    """The column `dirichlet` / `pathological` partition by and the report counts."""
    return settings.partition_by or DERIVED_LABEL


def _prepare(settings: DatasetSettings):
    """flwr-datasets preprocessor (it runs after the seeded shuffle): hold out the first
    validation rows of the shuffled train split, and add the derived label column when a label
    partitioner uses it. None when there is nothing to do, so IID partitions without a held-out
    split are exactly flwr-datasets' own."""
    add_label = settings.partitioner in LABEL_PARTITIONERS and not settings.partition_by
    if settings.validation_size == 0 and not add_label and not settings.partition_by:
        return None

    def prepare(dataset):
        train = dataset["train"]
        if settings.partition_by and settings.partition_by not in train.column_names:
            raise _problem("static.dataset.partition-by", settings.partition_by,
                           f"the dataset has no such column (its columns: "
                           f"{', '.join(train.column_names)}); name one of them, or leave it "
                           f"empty for the task type derived from the instruction")
        if add_label:
            if "instruction" not in train.column_names:
                raise _problem("static.dataset.partition-by", settings.partition_by,
                               "the derived task type needs an `instruction` column, which "
                               "this dataset lacks; name a label column")
            train = train.add_column(DERIVED_LABEL,
                                     [task_type(str(i)) for i in train["instruction"]])
        held_out = validation_count(settings.validation_size, len(train))
        dataset = DatasetDict(dict(dataset))
        if held_out:
            dataset[HELD_OUT_SPLIT] = train.select(range(held_out))
            train = train.select(range(held_out, len(train)))
        dataset["train"] = train
        return dataset

    return prepare


def make_partitioner(settings: DatasetSettings, seed: int):
    """The flwr-datasets partitioner `static.dataset.partitioner` names."""
    from flwr_datasets import partitioner as p

    n, name = settings.num_partitions, settings.partitioner
    if name == "iid":
        return p.IidPartitioner(num_partitions=n)
    if name == "dirichlet":
        # min_partition_size=1: flwr-datasets redraws (10 times at most) until none is empty
        return p.DirichletPartitioner(num_partitions=n, partition_by=label_column(settings),
                                      alpha=settings.dirichlet_alpha, min_partition_size=1,
                                      seed=seed)
    if name == "pathological":
        # first-deterministic: every label goes to some partition when there are at least as
        # many partitions as labels; the other labels of each partition are drawn by the seed
        return p.PathologicalPartitioner(
            num_partitions=n, partition_by=label_column(settings),
            num_classes_per_partition=settings.classes_per_partition,
            class_assignment_mode="first-deterministic", seed=seed)
    if name == "exponential":
        return p.ExponentialPartitioner(num_partitions=n)
    if name == "linear":
        return p.LinearPartitioner(num_partitions=n)
    raise _problem("static.dataset.partitioner", name,
                   "allowed values are iid, dirichlet, pathological, exponential, linear")


def _partition_failure(settings: DatasetSettings, err: Exception) -> ConfigError:
    """A partitioner's refusal as a ConfigError that says which key to change."""
    s, name = settings, settings.partitioner
    if name == "dirichlet":
        return _problem("static.dataset.dirichlet-alpha", s.dirichlet_alpha,
                        f"with static.dataset.num-partitions = {s.num_partitions} the Dirichlet "
                        f"draws keep leaving a partition empty ({err}); raise the alpha or "
                        f"lower num-partitions")
    if name == "pathological":
        return _problem("static.dataset.classes-per-partition", s.classes_per_partition,
                        f"the pathological partitioner refused it with static.dataset."
                        f"num-partitions = {s.num_partitions} ({err}); lower classes-per-"
                        f"partition or num-partitions")
    return _problem("static.dataset.partitioner", name,
                    f"with static.dataset.num-partitions = {s.num_partitions} it leaves a "
                    f"partition empty ({err}); lower num-partitions or use `iid`")


@functools.lru_cache(maxsize=2)
def federated_dataset(settings: DatasetSettings, seed: int):
    """One FederatedDataset per process; flwr-datasets caches the loaded partitions in it. The
    first call checks every partition (ConfigError naming the key when one is empty)."""
    from flwr_datasets import FederatedDataset

    partitioners = {"train": make_partitioner(settings, seed)}
    kwargs = {"partitioners": partitioners, "seed": seed, "preprocessor": _prepare(settings)}
    local = local_data_files(settings.name)
    if local is None:
        fds = FederatedDataset(dataset=settings.name, **kwargs)
    else:
        builder, files = local
        fds = FederatedDataset(dataset=builder, data_files=files, **kwargs)
    check_partitions(fds, settings)
    return fds


def check_partitions(fds, settings: DatasetSettings) -> None:
    """ConfigError naming the key when a partition is empty or the partitioner refuses the
    data (loading the train split first runs `_prepare`'s checks: the `partition-by` column,
    the validation size)."""
    train = fds.load_split("train")
    if settings.partitioner in LABEL_PARTITIONERS:
        labels = set(train[label_column(settings)])
        if settings.partitioner == "pathological" and settings.classes_per_partition > len(
                labels):
            raise _problem("static.dataset.classes-per-partition",
                           settings.classes_per_partition,
                           f"the label `{label_column(settings)}` has only {len(labels)} "
                           f"values; give at most {len(labels)}")
    if len(train) < settings.num_partitions:
        raise _problem("static.dataset.num-partitions", settings.num_partitions,
                       f"only {len(train)} training rows; give at most {len(train)} partitions")
    try:
        with warnings.catch_warnings():  # the Dirichlet redraws warn each time; we report
            warnings.filterwarnings("ignore", "The specified min_partition_size")
            sizes = [len(fds.load_partition(pid, "train"))
                     for pid in range(settings.num_partitions)]
    except ConfigError:
        raise
    except ValueError as err:
        raise _partition_failure(settings, err) from None
    empty = [pid for pid, size in enumerate(sizes) if size == 0]
    if empty:
        raise _partition_failure(settings, ValueError(f"partitions {empty[:10]} are empty"))


def load_partition(settings: DatasetSettings, partition_id: int, seed: int) -> Dataset:
    """Partition `partition_id` of the shared dataset, as `static.dataset.*` and the app's seed
    define it (the held-out rows are never in one)."""
    return federated_dataset(settings, seed).load_partition(partition_id, "train")


def load_validation_rows(settings: DatasetSettings, seed: int) -> Dataset | None:
    """The held-out rows (`static.dataset.validation-size`), None when it is 0. They are the
    first rows of the seed-shuffled train split, removed from it before partitioning, so no
    partition holds them."""
    if settings.validation_size == 0:
        return None
    return federated_dataset(settings, seed).load_split(HELD_OUT_SPLIT)


def load_validation(config: AppConfig, tokenizer) -> TokenizedPartition | None:
    """The held-out rows tokenised exactly as a client's training rows (same prompt template,
    input field, seq-length and EOS rule: prompt tokens masked, response tokens scored), for
    the server's mean token loss; None when `static.dataset.validation-size` is 0. Labels for a
    causal-LM loss: `masked_labels`."""
    rows = load_validation_rows(config.dataset, config.seed)
    if rows is None:
        return None
    return tokenize_partition(rows, tokenizer, config.train.seq_length,
                              config.dataset.keep_input_field, config.dataset.prompt_template,
                              train_eos=config.train.train_eos, task=config.task)


def masked_labels(example: dict) -> list[int]:
    """A tokenised example's labels as transformers' causal-LM loss takes them: the token where
    `completion_mask` is 1, -100 (ignored) elsewhere. TRL builds the same labels in training."""
    return [token if scored else -100
            for token, scored in zip(example["input_ids"], example["completion_mask"],
                                     strict=True)]


def partition_report(config: AppConfig) -> dict:
    """Per partition its size and label mix, for the run folder. The label is the
    `partition-by` column or else the derived task type (`task_type`), also for size-only
    partitioners. Building it checks every partition, so it raises the same ConfigErrors a
    client would meet, before any training."""
    settings, seed = config.dataset, config.seed
    fds = federated_dataset(settings, seed)
    column = label_column(settings)

    def labels_of(rows: Dataset) -> dict[str, int]:
        if column in rows.column_names:
            values = [str(v) for v in rows[column]]
        else:
            values = [task_type(str(i)) for i in rows["instruction"]]
        return dict(sorted(Counter(values).items()))

    partitions = []
    for pid in range(settings.num_partitions):
        rows = fds.load_partition(pid, "train")
        partitions.append({"partition": pid, "size": len(rows), "labels": labels_of(rows)})
    train = fds.load_split("train")
    held_out = load_validation_rows(settings, seed)
    assigned = sum(p["size"] for p in partitions)
    return {
        "dataset": settings.name,
        "partitioner": settings.partitioner,
        "label": column if settings.partition_by else f"{DERIVED_LABEL} (data.task_type)",
        "dirichlet_alpha": settings.dirichlet_alpha if settings.partitioner == "dirichlet"
        else None,
        "classes_per_partition": settings.classes_per_partition
        if settings.partitioner == "pathological" else None,
        "seed": seed,
        "training_rows": len(train),
        "validation_rows": 0 if held_out is None else len(held_out),
        "validation_labels": {} if held_out is None else labels_of(held_out),
        "unassigned_rows": len(train) - assigned,
        "labels": labels_of(train),
        "partitions": partitions,
    }


NODE_DATA_KEY = "--node-config data-path"
NODE_DATA_COLUMNS = ("instruction", "output")


class NodeDataError(ValueError):
    """A node's own data cannot be used. The message names the file and the problem, for the
    node's operator (its own log); `reason` classifies the problem without any path, for the
    server, which must not learn the node's file system layout."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _node_rows(path: str, streaming: bool):
    """The node's rows and the first of them, or NodeDataError. Streaming reads only as far
    as the first row (of the first file of a folder) and builds no Arrow cache."""
    from datasets import load_dataset

    if not Path(path).expanduser().exists():
        raise NodeDataError("data file missing", f"{NODE_DATA_KEY} = {path!r} does not exist "
                            "on this node")
    try:
        local = local_data_files(path, NODE_DATA_KEY)
    except ValueError as err:
        raise NodeDataError("data path holds no single-format .json, .jsonl or .parquet data",
                            str(err)) from None
    assert local is not None  # the path exists
    builder, files = local
    if all(Path(file).stat().st_size == 0 for file in files):
        raise NodeDataError("data file has no rows", f"{NODE_DATA_KEY} = {path!r}: empty")
    try:
        rows = load_dataset(builder, data_files=files, split="train", streaming=streaming)
        first = next(iter(rows), None)
    except Exception as err:  # datasets raises many types for unreadable files
        raise NodeDataError(f"data file unreadable as {builder}",
                            f"{NODE_DATA_KEY} = {path!r} cannot be read as {builder}: "
                            f"{type(err).__name__}: {err}") from None
    if first is None:
        raise NodeDataError("data file has no rows", f"{NODE_DATA_KEY} = {path!r} has no rows")
    missing = [column for column in NODE_DATA_COLUMNS if column not in first]
    if missing:
        names = ", ".join(f"`{column}`" for column in missing)
        raise NodeDataError(f"no {names} column",
                            f"{NODE_DATA_KEY} = {path!r}: the rows have no {', '.join(missing)} "
                            "column; expected alpaca rows with instruction, input (optional) and "
                            "output")
    return rows


def check_node_data(path: str) -> None:
    """The query step's check of a node's own data, cheap enough for any size: the file opens,
    it has a first row, and that row has the alpaca columns. NodeDataError otherwise."""
    _node_rows(path, streaming=True)


def load_node_data(path: str) -> Dataset:
    """A node's own alpaca rows (`data-path` in its --node-config); NodeDataError when they are
    missing, unreadable or not alpaca rows."""
    return _node_rows(path, streaming=False)


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
                     add_special_tokens: bool = True, train_eos: bool = True) -> dict | None:
    """input_ids = prompt + response + EOS, truncated to max_length; completion_mask marks the
    tokens that carry loss: the response, and the EOS when `train_eos` (`train.train-eos`; false
    keeps the EOS in the input but out of the loss, as the published FlowerTune baseline does,
    whose pad token is its EOS and is masked as padding). None when truncation leaves no
    response token, which would otherwise train with zero loss. A chat-template prompt already
    holds its special tokens, so it is encoded without adding more."""
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = [*response_ids, tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        return None
    input_ids = (prompt_ids + response_ids)[:max_length]
    completion_mask = [0] * len(prompt_ids) + [1] * (len(input_ids) - len(prompt_ids))
    if not train_eos and len(input_ids) == len(prompt_ids) + len(response_ids):
        completion_mask[-1] = 0  # the EOS survived truncation: keep it out of the loss
    return {"input_ids": input_ids, "completion_mask": completion_mask}


def tokenize_partition(
    rows: Dataset, tokenizer, max_length: int, keep_input: bool, template: str = "alpaca",
    train_eos: bool = True, task: str = DEFAULT_TASK,
) -> TokenizedPartition:
    """Each row as the task reads it (`tasks.Task.training_row`: finance and code join
    instruction and input, medical asks the question), prompted and tokenised."""
    training_row = get_task(task).training_row
    examples: list[dict] = []
    dropped_empty = dropped_truncated = 0
    for row in rows:
        instruction, context, output = training_row(row, keep_input)
        if not instruction.strip() or not output.strip():
            dropped_empty += 1
            continue
        if template == "chat":
            prompt = chat_prompt(tokenizer, instruction, context, keep_input)
        else:
            prompt = format_prompt(instruction, context, keep_input)
        example = tokenize_example(tokenizer, prompt, output.strip(), max_length,
                                   add_special_tokens=template != "chat", train_eos=train_eos)
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


def split_local_eval(partition: TokenizedPartition, share: float
                     ) -> tuple[TokenizedPartition, Dataset]:
    """A client's rows for training and its held-back rows for federated evaluation: the last
    `share` of the partition (already a seeded shuffle of the data), at least one row each."""
    rows = len(partition.dataset)
    held_back = max(1, round(rows * share))
    if rows - held_back < 1:
        raise ValueError(f"{rows} usable row(s) cannot be split for federated evaluation "
                         f"(static.dataset.local-eval-share = {share:g}): the client needs at "
                         "least 2 rows, or strategy.fraction-evaluate = 0")
    train = replace(partition, dataset=partition.dataset.select(
        range(rows - held_back)))
    return train, partition.dataset.select(range(rows - held_back, rows))


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
