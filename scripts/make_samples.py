"""Rebuild data/samples/: small, licensed subsets of the offline data, laid out exactly like
../shared/data (same relative paths, same file formats), so that every loader and
`--data-dir data/samples` work unchanged in a fresh clone.

    .venv/bin/python scripts/make_samples.py ../shared/data [--out data/samples]

Deterministic: the same source folder gives the same bytes (tests/test_samples.py checks the
committed folder against it). Each file keeps its source's format: CSV and JSON Lines files are a
byte prefix of the source (MBPP: its lines with task_id <= 30); JSON files hold the source's
first entries in the source's own layout; the gzip file holds the source's first lines,
recompressed without a timestamp. Datasets without a licence that allows redistribution are
left out, and so is whatever needs them (listed in the generated README).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/make_samples.py`
    sys.path.insert(0, str(ROOT))

from evaluation.mmlu import ALL_SUBJECTS  # noqa: E402
from flowertune_nlp.cli import ArgumentParser  # noqa: E402

DEFAULT_OUT = ROOT / "data" / "samples"
SIZE_LIMIT = 3 * 1024 * 1024  # bytes, whole folder: the repository stays light
TRAINING_ROWS = 300  # alpaca-gpt4 and Code Alpaca 2k rows (the tiny test model reads 300)
MMLU_TEST_ROWS = 10  # per subject: the cpu-smoke preset scores 10 per subject
EVAL_ITEMS = 20  # per finance/medical/code set: the cpu-smoke presets score at most 20
MBPP_LAST_TASK = 10 + EVAL_ITEMS  # task_ids 1-10 (few-shot prompts) + the first test tasks

Cut = Callable[[Path], bytes]  # source folder -> the sample file's bytes


class SourceError(ValueError):
    """The source folder is not laid out (or formatted) like ../shared/data."""


@dataclass(frozen=True)
class Origin:
    """Where a dataset's files come from and under which licence (../shared/data/README.md)."""

    dataset: str
    upstream: str  # repository @ commit, path(s)
    licence: str
    non_commercial: bool = False


@dataclass(frozen=True)
class Sample:
    path: str  # relative, the same in the source folder and in the samples
    origin: str  # key of ORIGINS
    subset: str
    cut: Cut


ORIGINS = {
    "alpaca-gpt4": Origin(
        "alpaca-gpt4 (GPT-4-LLM, Peng et al. 2023; HF vicgalle/alpaca-gpt4), 1,000-row sample",
        "hiyouga/LLaMA-Factory @ edd112f35c12597f5c638d8e737910d7aff9ec9d, "
        "data/alpaca_en_demo.json", "CC BY-NC 4.0", non_commercial=True),
    "mmlu": Origin(
        "MMLU (Hendrycks et al. 2021), cais/mmlu layout",
        "HaeChan0305/MLILAB-FedLLM @ d92730e8bacd7b3a61e551e015e40588e10234b4, "
        "data/mmlu/{test,dev}/*.csv", "MIT (hendrycks/test)"),
    "fpb": Origin(
        "Financial PhraseBank v1.0, sentences_50agree (Malo et al. 2014)",
        "fabsGitHub/sentiment-analysis @ 0f92dda15b61f54b36a5ba73c80f7a951ef2ca76, "
        "data/Sentences_50Agree.txt", "CC BY-NC-SA 3.0", non_commercial=True),
    "tfns": Origin(
        "Twitter Financial News Sentiment, validation (HF zeroshot/twitter-financial-news-"
        "sentiment)", "AI4Finance-Foundation/FinGPT @ ec315843886de0906692782090127d37f5400d60, "
        "fingpt/FinGPT_RAG/multisource_retrieval/data/sent_valid.csv",
        "MIT (HF dataset card)"),
    "pubmedqa-truth": Origin(
        "PubMedQA PQA-L official test set (Jin et al. 2019)",
        "pubmedqa/pubmedqa @ 1cbae8e92f72f20c8d3747cbb3bf5bc53554d997, "
        "data/test_ground_truth.json", "MIT (pubmedqa/pubmedqa)"),
    "pubmedqa-set": Origin(
        "PubMedQA PQA-L official test set (Jin et al. 2019)",
        "Teddy-XiongGZ/MIRAGE @ 392943af99cd94cafd50a0de2e7fca24bbf65494, "
        "rawdata/pubmedqa/data/test_set.json", "MIT (pubmedqa/pubmedqa)"),
    "medqa": Origin(
        "MedQA USMLE 4 options, test (Jin et al. 2020)",
        "Teddy-XiongGZ/MIRAGE @ 392943af99cd94cafd50a0de2e7fca24bbf65494, "
        "rawdata/medqa/data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl",
        "MIT (jind11/MedQA)"),
    "medmcqa": Origin(
        "MedMCQA dev = HF validation (Pal et al. 2022)",
        "Teddy-XiongGZ/MIRAGE @ 392943af99cd94cafd50a0de2e7fca24bbf65494, "
        "rawdata/medmcqa/data/dev.json", "MIT (medmcqa/medmcqa)"),
    "humaneval": Origin(
        "HumanEval (Chen et al. 2021)",
        "openai/human-eval @ 6d43fb980f9fee3c892a914eda09951f772ad10d, data/HumanEval.jsonl.gz",
        "MIT (openai/human-eval)"),
    "mbpp": Origin(
        "MBPP (Austin et al. 2021), DeepSeek-Coder's copy",
        "deepseek-ai/DeepSeek-Coder @ 2f9fd85927c669dae3c0fbb2d607274023af243e, "
        "Evaluation/MBPP/data/mbpp.jsonl", "CC BY 4.0 (HF mbpp dataset card)"),
    "multipl-e": Origin(
        "MultiPL-E HumanEval translations (Cassano et al. 2023), DeepSeek-Coder's copy",
        "deepseek-ai/DeepSeek-Coder @ 2f9fd85927c669dae3c0fbb2d607274023af243e, "
        "Evaluation/HumanEval/data/humaneval-{js,cpp}.jsonl",
        "MIT (HF nuprl/MultiPL-E dataset card); see the notice below"),
    "code-alpaca-2k": Origin(
        "Code Alpaca 2k (Chaudhary 2023), the 2k release, not a subset of CodeAlpaca-20k",
        "sahil280114/codealpaca @ 2f78ddc5c682ed6738ad092bbbfa59ba915afcb0, "
        "data/code_alpaca_2k.json", "CC BY-NC 4.0", non_commercial=True),
}


# ----------------------------------------------------------------------------- cuts


def _read(source: Path, relative: str) -> bytes:
    path = source / relative
    if not path.is_file():
        raise SourceError(f"{path} is missing: the source folder must be laid out like "
                          "../shared/data (see its README.md)")
    return path.read_bytes()


def _lines(raw: bytes) -> list[bytes]:
    """Lines with their b"\\n", split at b"\\n" only (JSON Lines escape every other break)."""
    parts = raw.split(b"\n")
    return [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def whole(relative: str) -> Cut:
    return lambda source: _read(source, relative)


def first_lines(relative: str, count: int) -> Cut:
    return lambda source: b"".join(_lines(_read(source, relative))[:count])


def mbpp_lines(relative: str, last_task: int) -> Cut:
    """The lines whose task_id is at most `last_task`, in file order."""
    def cut(source: Path) -> bytes:
        lines = _lines(_read(source, relative))
        return b"".join(line for line in lines if json.loads(line)["task_id"] <= last_task)
    return cut


def gzip_lines(relative: str, count: int) -> Cut:
    """The first lines of a gzip file, recompressed with no timestamp (reproducible)."""
    def cut(source: Path) -> bytes:
        text = gzip.decompress(_read(source, relative))
        return gzip.compress(b"".join(_lines(text)[:count]), compresslevel=9, mtime=0)
    return cut


def first_csv_records(relative: str, count: int) -> Cut:
    """The header and the first `count` records (fields may hold line breaks), checked to be a
    byte prefix of the source."""
    def cut(source: Path) -> bytes:
        raw = _read(source, relative)
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows[:count + 1])
        data = out.getvalue().encode("utf-8")
        if not raw.startswith(data):
            raise SourceError(f"{source / relative}: not in the expected CSV layout (minimal "
                              "quoting, LF line ends); compare it with ../shared/data")
        return data
    return cut


def _json_layout(raw: bytes, where: Path) -> dict:
    """The json.dumps arguments (and trailing newline) that write `raw` back byte for byte."""
    data = json.loads(raw)
    for indent in (2, 4, 6):
        for ensure_ascii in (True, False):
            text = json.dumps(data, indent=indent, ensure_ascii=ensure_ascii)
            for tail in ("", "\n"):
                if (text + tail).encode("utf-8") == raw:
                    return {"indent": indent, "ensure_ascii": ensure_ascii, "tail": tail}
    raise SourceError(f"{where}: its JSON layout is not one json.dumps writes back; "
                      "compare it with ../shared/data")


def _dump_like(raw: bytes, data, where: Path) -> bytes:
    layout = _json_layout(raw, where)
    tail = layout.pop("tail")
    return (json.dumps(data, **layout) + tail).encode("utf-8")


def first_json_entries(relative: str, count: int) -> Cut:
    """The first `count` entries of a JSON array or object, in the source's own layout."""
    def cut(source: Path) -> bytes:
        raw = _read(source, relative)
        data = json.loads(raw)
        kept = data[:count] if isinstance(data, list) else dict(list(data.items())[:count])
        return _dump_like(raw, kept, source / relative)
    return cut


def json_entries_of(relative: str, keys_from: Cut) -> Cut:
    """The entries of a JSON object whose keys are those of another sample (PubMedQA's answers
    for the questions kept), in this file's order and layout."""
    def cut(source: Path) -> bytes:
        raw = _read(source, relative)
        keys = set(json.loads(keys_from(source)))
        kept = {k: v for k, v in json.loads(raw).items() if k in keys}
        if len(kept) != len(keys):
            raise SourceError(f"{source / relative} lacks {len(keys) - len(kept)} of the keys "
                              "kept in the sample it pairs with")
        return _dump_like(raw, kept, source / relative)
    return cut


# ----------------------------------------------------------------------------- the samples


def _samples() -> list[Sample]:
    pubmedqa_set = first_json_entries("medical/pubmedqa/test_set.json", EVAL_ITEMS)
    first = f"first {EVAL_ITEMS}"
    samples = [
        Sample("alpaca-gpt4/alpaca_en_demo.json", "alpaca-gpt4",
               f"first {TRAINING_ROWS} of 1,000 rows",
               first_json_entries("alpaca-gpt4/alpaca_en_demo.json", TRAINING_ROWS)),
    ]
    samples += [Sample(f"mmlu/test/{subject}_test.csv", "mmlu",
                       f"header + first {MMLU_TEST_ROWS} questions",
                       first_csv_records(f"mmlu/test/{subject}_test.csv", MMLU_TEST_ROWS))
                for subject in ALL_SUBJECTS]
    samples += [Sample(f"mmlu/dev/{subject}_dev.csv", "mmlu", "whole (5 questions)",
                       whole(f"mmlu/dev/{subject}_dev.csv")) for subject in ALL_SUBJECTS]
    samples += [
        Sample("finance/fpb/Sentences_50Agree.txt", "fpb",
               "whole (4,846 sentences: the leaderboard's 25 % split is drawn over all of them)",
               whole("finance/fpb/Sentences_50Agree.txt")),
        Sample("finance/tfns/sent_valid.csv", "tfns", f"header + {first} of 2,388 tweets",
               first_csv_records("finance/tfns/sent_valid.csv", EVAL_ITEMS)),
        Sample("medical/pubmedqa/test_set.json", "pubmedqa-set", f"{first} of 500 questions",
               pubmedqa_set),
        Sample("medical/pubmedqa/test_ground_truth.json", "pubmedqa-truth",
               f"the answers of the {EVAL_ITEMS} questions in test_set.json",
               json_entries_of("medical/pubmedqa/test_ground_truth.json", pubmedqa_set)),
        Sample("medical/medqa/phrases_no_exclude_test.jsonl", "medqa",
               f"{first} of 1,273 questions",
               first_lines("medical/medqa/phrases_no_exclude_test.jsonl", EVAL_ITEMS)),
        Sample("medical/medmcqa/dev.json", "medmcqa", f"{first} of 4,183 questions",
               first_lines("medical/medmcqa/dev.json", EVAL_ITEMS)),
        Sample("code/humaneval/HumanEval.jsonl.gz", "humaneval",
               f"{first} of 164 problems (HumanEval/0-{EVAL_ITEMS - 1})",
               gzip_lines("code/humaneval/HumanEval.jsonl.gz", EVAL_ITEMS)),
        Sample("code/mbpp/mbpp.jsonl", "mbpp",
               f"task_ids 1-{MBPP_LAST_TASK}: the 10 few-shot prompts and the {first} test "
               "problems (test = 11-510)", mbpp_lines("code/mbpp/mbpp.jsonl", MBPP_LAST_TASK)),
    ]
    for language in ("js", "cpp"):
        relative = f"code/multipl-e/humaneval-{language}.jsonl"
        samples.append(Sample(relative, "multipl-e", f"{first} of 161 problems",
                              first_lines(relative, EVAL_ITEMS)))
    samples.append(Sample("code/code-alpaca-2k-fallback/code_alpaca_2k.json", "code-alpaca-2k",
                          f"first {TRAINING_ROWS} of 2,017 rows",
                          first_json_entries("code/code-alpaca-2k-fallback/code_alpaca_2k.json",
                                             TRAINING_ROWS)))
    return samples


SAMPLES = _samples()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(source: Path) -> dict[str, bytes]:
    """Every file of the samples folder (data, README.md, SHA256SUMS) by relative path."""
    files = {s.path: s.cut(Path(source)) for s in SAMPLES}
    sums = "".join(f"{sha256(files[s.path])}  ./{s.path}\n" for s in SAMPLES)
    files["README.md"] = readme(files).encode("utf-8")
    files["SHA256SUMS"] = sums.encode("utf-8")
    return files


# ----------------------------------------------------------------------------- README

_INTRO = """\
# Offline samples

Small subsets of the project's offline data (`../shared/data`), laid out exactly like it: the
same relative paths and file formats, so every loader and `--data-dir data/samples` work
unchanged in a fresh clone with no network. They serve the README's first command (general NLP,
`--preset cpu-smoke`) and the tests that need *some* real data. Results and benchmarks use the
full copies (`../shared/data`, described in its README) or the Hugging Face hub.

Rebuild with `.venv/bin/python scripts/make_samples.py ../shared/data`; the output is
deterministic, and `tests/test_samples.py` checks that this folder is exactly that output.
Check the files with `cd data/samples && sha256sum -c SHA256SUMS`.

How the files are cut: CSV and JSON Lines files are a byte-for-byte prefix of their source
(MBPP: its lines with task_id <= {mbpp}); JSON files hold the source's first entries, written in
the source's own layout (indent, escaping); `HumanEval.jsonl.gz` holds the source's first lines,
recompressed without a timestamp. Evaluation sets keep the official order, so the first N items
here are the first N items of the full set.

**Non-commercial data.** The files marked **NC** below are licensed for non-commercial use
only (CC BY-NC 4.0, CC BY-NC-SA 3.0). Do not use them, or anything trained on them, commercially.

## What works offline from the samples

- general NLP: training on {rows} alpaca-gpt4 rows; MMLU with {mmlu} questions per subject (all
  57 subjects; dev, for few-shot, complete).
- finance: evaluation on FPB (the whole file, so the leaderboard's 1,212-row split) and TFNS
  (first {items}). **No FiQA**, and so **no training**: the stand-in is built from FPB and FiQA.
- medical: evaluation on PubMedQA, MedQA and MedMCQA (first {items} each); CareQA is hub-only.
  **No training**: the stand-in (Medical Meadow WikiDoc) is not here.
- code: training on {rows} Code Alpaca 2k rows; HumanEval, MBPP, MultiPL-E JS and C++ (first
  {items} each).

For finance and medical training offline, and for FiQA, use `--data-dir ../shared/data` or
the hub.

## Files

| file | subset | source | licence | SHA-256 |
| --- | --- | --- | --- | --- |
"""

_SOURCES = """
## Sources

All files are cut from the copies in `../shared/data`, which are byte-for-byte copies of the
upstream files below (their provenance and checks: `../shared/data/README.md`).

"""

_LEFT_OUT = """
## Left out, and why

- **FiQA-2018** (`finance/fiqa-2018/`: the raw task-1 files and FlowerTune's 304-row reference
  file): no licence is stated for the FiQA 2018 challenge data, so it is not redistributed here.
  Without it the finance evaluation has no FiQA set and the finance training stand-in (FPB and
  FiQA rows outside the evaluation splits) cannot be built from the samples.
- **Medical Meadow WikiDoc patient information**
  (`medical/medical-meadow-wikidoc-patient-information-fallback/`, the offline medical training
  stand-in): no licence is stated for this data (medAlpaca's code is GPL-3.0; its data
  description names none).
- `medical/pubmedqa/ori_pqal.json` (no loader reads it), the alpaca-cleaned text-davinci-003
  fallback (no loader reads it).
"""

_NOTICES = """
## Licence notices

CC licences: [CC BY 4.0](https://creativecommons.org/licenses/by/4.0/),
[CC BY-NC 4.0](https://creativecommons.org/licenses/by-nc/4.0/),
[CC BY-NC-SA 3.0](https://creativecommons.org/licenses/by-nc-sa/3.0/). The changes made are the
subsets described in the table above; FPB is unchanged.

The MIT-licensed files carry these copyright notices and the permission notice below:
MMLU: Copyright (c) 2020 Dan Hendrycks. HumanEval: Copyright (c) OpenAI (https://openai.com).
PubMedQA: Copyright (c) 2019 pubmedqa. MedQA: Copyright (c) 2022 Di Jin. MedMCQA: Copyright (c)
2022 MedMCQA. TFNS and MultiPL-E: MIT as stated on their Hugging Face dataset cards.

> Permission is hereby granted, free of charge, to any person obtaining a copy of this software
> and associated documentation files (the "Software"), to deal in the Software without
> restriction, including without limitation the rights to use, copy, modify, merge, publish,
> distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
> Software is furnished to do so, subject to the following conditions:
>
> The above copyright notice and this permission notice shall be included in all copies or
> substantial portions of the Software.
>
> THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
> BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
> NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
> DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
> OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.

MultiPL-E: the nuprl/MultiPL-E *repository* is licensed "BSD 3-Clause License with Machine
Learning Restriction" (Copyright (c) 2022, Northeastern University, Oberlin College, Roblox Inc,
Stevens Institute of Technology, University of Massachusetts Amherst, and Wellesley College),
whose clause 4 says its contents may not be used as training data for any machine learning
model. The dataset on the hub is published as MIT. Either way: the MultiPL-E files here are
evaluation sets; never train on them.
"""


def readme(files: dict[str, bytes]) -> str:
    """The samples' README: what works offline, then per file its subset, source, licence and
    SHA-256, the sources in full, what is left out, and the licence notices."""
    text = _INTRO.format(mbpp=MBPP_LAST_TASK, rows=TRAINING_ROWS, mmlu=MMLU_TEST_ROWS,
                         items=EVAL_ITEMS)
    for s in SAMPLES:
        origin = ORIGINS[s.origin]
        repository = origin.upstream.split(" @ ")[0]
        commit = origin.upstream.split(" @ ")[1][:7]
        licence = origin.licence.split(" (")[0].split(";")[0]
        mark = " **NC**" if origin.non_commercial else ""
        text += (f"| `{s.path}` | {s.subset} | [{repository}@{commit}](#{s.origin}) | "
                 f"{licence}{mark} | `{sha256(files[s.path])}` |\n")
    total = sum(len(files[s.path]) for s in SAMPLES)
    text += f"\n{len(SAMPLES)} data files, {total:,} bytes in all.\n" + _SOURCES
    for key, origin in ORIGINS.items():
        mark = " **Non-commercial use only.**" if origin.non_commercial else ""
        text += (f'- <a id="{key}"></a>**{origin.dataset}**: {origin.upstream}. '
                 f"Licence: {origin.licence}.{mark}\n")
    return text + _LEFT_OUT + _NOTICES


# ----------------------------------------------------------------------------- writing


def write_folder(target: Path, files: dict[str, bytes]) -> None:
    """Write the folder beside `target`, then swap it in: a failure leaves the old folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old = target.with_name(f".{target.name}.old")
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        for relative, data in sorted(files.items()):
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/make_samples.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a folder laid out like ../shared/data")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="the samples folder to (re)write (default: data/samples)")
    args = parser.parse_args(argv)
    source, out = Path(args.source).expanduser().resolve(), Path(args.out).expanduser().resolve()
    if not source.is_dir():
        print(f"error: {source} is not a folder; pass the offline data folder, e.g. "
              "../shared/data", file=sys.stderr)
        return 2
    if out == source or source in out.parents:
        print(f"error: --out {out} lies inside the source folder; write the samples elsewhere",
              file=sys.stderr)
        return 2
    try:
        files = build(source)
    except (SourceError, json.JSONDecodeError, UnicodeDecodeError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(len(files[s.path]) for s in SAMPLES)
    if size > SIZE_LIMIT:
        print(f"error: the samples would hold {size:,} bytes, over the {SIZE_LIMIT:,}-byte "
              "limit; cut fewer rows (the constants at the top of this script)",
              file=sys.stderr)
        return 2
    write_folder(out, files)
    print(f"{out}: {len(SAMPLES)} data files, {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
