"""The code challenge's four benchmarks as bigcode-evaluation-harness defines them: where the
problems come from, the prompt each gets, where a completion stops, and the program that tests it.

Byte-level details follow the harness (tasks/humaneval.py, mbpp.py, multiple.py and
custom_metrics/code_eval.py): the program is prompt + completion + "\\n" + reference, where the
HumanEval reference itself starts with "\\n" (so a blank line precedes the tests).
"""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

from evaluation.suite import Benchmark, Item, NotAvailable

MULTIPLE_REVISION = "d23b094346c5dbda1080a74bb2a24c18adbf7409"  # the harness's pinned revision

BENCHMARKS: dict[str, Benchmark] = {
    "humaneval": Benchmark("humaneval", "HumanEval", "openai_humaneval (test)",
                           "code/humaneval/HumanEval.jsonl.gz", 164),
    "mbpp": Benchmark("mbpp", "MBPP", "mbpp (full config, test split = task_ids 11-510)",
                      "code/mbpp/mbpp.jsonl", 500),
    "multiple-js": Benchmark("multiple-js", "JS", "nuprl/MultiPL-E humaneval-js (test)",
                             "code/multipl-e/humaneval-js.jsonl", 161),
    "multiple-cpp": Benchmark("multiple-cpp", "C++", "nuprl/MultiPL-E humaneval-cpp (test)",
                              "code/multipl-e/humaneval-cpp.jsonl", 161),
}
LANGUAGES = {"humaneval": "python", "mbpp": "python", "multiple-js": "js", "multiple-cpp": "cpp"}
# --max_length_generation: prompt + completion tokens.
MAX_LENGTH = {"humaneval": 1024, "mbpp": 2048, "multiple-js": 1024, "multiple-cpp": 1024}

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"]
MBPP_STOP = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"]
MBPP_TEST = range(11, 511)

# Problems no completion can pass, found by `check_references` (reported there, not hidden).
KNOWN_UNSOLVABLE = {
    "multiple-js": {"HumanEval_51_remove_vowels": "its tests hold a raw newline inside a string "
                    "literal (\"abcdef<newline>ghijklm\"): a SyntaxError whatever the completion"},
    "multiple-cpp": {"HumanEval_137_compare_one": "its tests pass an int where the prompt's "
                     "signature takes Union_long_float_std_string (candidate(\"1\", 1)); g++ finds "
                     "the conversion ambiguous (long or float): a compile error whatever the "
                     "completion"},
}

# A body that compiles for any signature and fails when the tests call it: MultiPL-E rows have
# no reference solution, so this is how every problem's prompt + tests program is checked.
STUB_MARKER = "STUB-CALLED"
_STUB_BODY = {
    "js": f'\n  throw new Error("{STUB_MARKER}");\n}}',
    "cpp": f'\n    throw std::runtime_error("{STUB_MARKER}");',  # the tests open with "}"
}


def stop_words(item: Item) -> list[str]:
    """The task's stop strings (the generator adds the tokenizer's EOS string)."""
    return list(item.data["stop_words"])


def prompt(item: Item) -> str:
    return item.data["prompt"]


def program(item: Item, completion: str, *, setup: bool = False) -> str:
    """What the harness executes for `completion`: prompt + completion + "\\n" + reference.
    MBPP's `test_setup_code` (task 367 in the test split) is left out by the harness, so that
    problem cannot pass; `setup=True` puts it between the solution and the asserts."""
    return prompt(item) + completion + "\n" + _tests(item, setup)


def _tests(item: Item, setup: bool) -> str:
    if setup and item.data.get("test_setup_code"):
        return item.data["test_setup_code"] + "\n" + item.gold
    return item.gold


def reference_program(item: Item) -> str | None:
    """The dataset's own solution run against the tests, or None where there is none
    (MultiPL-E rows carry no solution, and HumanEval's Python one cannot stand in for JS/C++)."""
    solution = _solution(item)
    return None if solution is None else solution + "\n" + _tests(item, setup=True)


def _solution(item: Item) -> str | None:
    if item.benchmark == "humaneval":
        return item.data["raw_prompt"] + item.data["canonical_solution"]
    if item.benchmark == "mbpp":
        return item.data["code"]
    return None


def stub_program(item: Item) -> str:
    """A deliberately wrong solution that must fail: Python sets keep the reference but redefine
    each of its top-level functions to raise; MultiPL-E gets a throwing body after the prompt."""
    solution = _solution(item)
    if solution is None:
        return program(item, _STUB_BODY[LANGUAGES[item.benchmark]])
    names = [node.name for node in ast.parse(solution).body if isinstance(node, ast.FunctionDef)]
    stubs = "".join(f"\ndef {n}(*args, **kwargs):\n    raise AssertionError('{STUB_MARKER}')\n"
                    for n in names)
    return solution + stubs + "\n" + _tests(item, setup=True)


# ----------------------------------------------------------------------------- loading


def load_items(name: str, data_dir: str | Path | None, limit: int | None = None) -> list[Item]:
    """The first `limit` problems in the official order: from `data_dir` (the files of
    shared/data/code) when given, else from the Hugging Face hub.

    MBPP offline is DeepSeek-Coder's copy of mbpp.jsonl. It matches the hub's `mbpp` test split
    except task 341, whose text reads "... into ordered tuples." where the hub has "... into
    tuples." (the asserts expect sorted tuples either way); the copy's text is kept as is.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown code benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    rows = _local_rows(name, Path(data_dir)) if data_dir is not None else _hub_rows(name)
    items = [_item(name, row) for row in rows]
    return items[:limit] if limit is not None else items


def _local_rows(name: str, data_dir: Path) -> list[dict]:
    path = data_dir / BENCHMARKS[name].local
    if not path.is_file():
        raise NotAvailable(f"{name}: {path} not found; pass the shared data folder as "
                           "--data-dir (it holds code/humaneval, code/mbpp, code/multipl-e)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if name == "mbpp":
        rows = [r for r in rows if r["task_id"] in MBPP_TEST]
    return rows


def _hub_rows(name: str) -> list[dict]:
    """The hub datasets the harness loads (not reachable from every machine)."""
    try:
        from datasets import load_dataset

        if name == "humaneval":
            return list(load_dataset("openai_humaneval", split="test"))
        if name == "mbpp":
            return list(load_dataset("mbpp", split="test"))
        config = "humaneval-" + LANGUAGES[name]
        return list(load_dataset("nuprl/MultiPL-E", config, split="test",
                                 revision=MULTIPLE_REVISION))
    except Exception as err:  # offline, hub error, missing dataset: the set cannot be had here
        raise NotAvailable(f"{name}: could not load {BENCHMARKS[name].hub} from the hub "
                           f"({type(err).__name__}: {err}); pass --data-dir with the offline "
                           "copy") from err


def _item(name: str, row: dict) -> Item:
    if name == "humaneval":
        reference = "\n" + row["test"] + "\n" + f"check({row['entry_point']})"
        return Item(name, row["task_id"], reference,
                    {"prompt": row["prompt"].strip(), "raw_prompt": row["prompt"],
                     "canonical_solution": row["canonical_solution"],
                     "stop_words": HUMANEVAL_STOP})
    if name == "mbpp":
        text = f'"""\n{row["text"]}\n{row["test_list"][0]}\n"""\n'
        return Item(name, str(row["task_id"]), "\n".join(row["test_list"]),
                    {"prompt": text, "code": row["code"],
                     "test_setup_code": row["test_setup_code"], "stop_words": MBPP_STOP})
    return Item(name, row["name"], row["tests"],
                {"prompt": row["prompt"].strip(),
                 "stop_words": [*row["stop_tokens"], "<file_sep>"]})
