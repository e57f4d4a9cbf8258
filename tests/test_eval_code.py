"""Code challenge (evaluation/code): prompts and programs byte for byte, stop words, pass@k,
real programs through the sandbox, and a tiny model's completions flowing into records."""

import itertools
import json

import pytest
import torch
from tiny import SHARED_DATA
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation.code import benchmarks as bench
from evaluation.code.generation import StopStrings, completions, cut_at_stop
from evaluation.code.sandbox import Job, missing_toolchain, run_jobs
from evaluation.code.suite import (
    check_references,
    pass_at_k,
    run_protocol,
    summarize_extra,
)
from evaluation.suite import NotAvailable, Options


def _item(name: str, qid: str):
    return next(i for i in bench.load_items(name, SHARED_DATA) if i.qid == qid)


def _needs(language: str) -> None:
    hint = missing_toolchain(language)
    if hint:
        pytest.skip(hint)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


# ----------------------------------------------------------------------------- data, bytes


@pytest.mark.shared_data
def test_offline_sets_have_the_official_counts_and_order():
    for name, benchmark in bench.BENCHMARKS.items():
        items = bench.load_items(name, SHARED_DATA)
        assert len(items) == benchmark.count, name
        assert len({i.qid for i in items}) == benchmark.count, name
    assert [i.qid for i in bench.load_items("mbpp", SHARED_DATA)] == [
        str(t) for t in range(11, 511)]
    assert [i.qid for i in bench.load_items("humaneval", SHARED_DATA, limit=2)] == [
        "HumanEval/0", "HumanEval/1"]
    assert bench.load_items("multiple-js", SHARED_DATA, limit=1)[0].qid == "HumanEval_23_strlen"
    with pytest.raises(NotAvailable, match="--data-dir"):
        bench.load_items("mbpp", SHARED_DATA / "no-such-folder")


@pytest.mark.shared_data
def test_mbpp_prompt_bytes_for_task_11():
    item = _item("mbpp", "11")
    assert bench.prompt(item) == (
        '"""\nWrite a python function to remove first and last occurrence of a given character '
        'from the string.\nassert remove_Occ("hello","l") == "heo"\n"""\n')
    assert bench.program(item, "def f(): pass") == (
        bench.prompt(item) + "def f(): pass\n" + 'assert remove_Occ("hello","l") == "heo"\n'
        'assert remove_Occ("abcda","a") == "bcd"\nassert remove_Occ("PHP","P") == "H"')


@pytest.mark.shared_data
def test_mbpp_setup_code_only_in_robust_programs():
    item = _item("mbpp", "367")  # the one test problem with test_setup_code
    assert "root = Node(1)" not in bench.program(item, "")  # the harness drops it
    assert "root = Node(1)" in bench.program(item, "", setup=True)


@pytest.mark.shared_data
def test_humaneval_program_is_the_harness_assembly():
    item = _item("humaneval", "HumanEval/0")
    completion = "\n    return False\n"
    raw_prompt = item.data["raw_prompt"]
    test = item.gold[1:-len("\ncheck(has_close_elements)")]
    assert bench.prompt(item) == raw_prompt.strip()
    # code_eval joins candidate and reference with "\n"; the reference starts with "\n".
    assert bench.program(item, completion) == (
        raw_prompt.strip() + completion + "\n\n" + test + "\ncheck(has_close_elements)")


@pytest.mark.shared_data
def test_multiple_cpp_completion_is_cut_before_the_closing_brace():
    item = _item("multiple-cpp", "HumanEval_23_strlen")
    assert bench.stop_words(item) == ["\n}", "<file_sep>"]
    raw = "\n    return string.size();\n}\nint main() {}"
    completion = cut_at_stop(raw, bench.stop_words(item))
    assert completion == "\n    return string.size();"
    assert bench.program(item, completion).endswith(
        "{\n    return string.size();\n}\nint main() {\n    auto candidate = string_length;\n"
        '    assert(candidate(("")) == (0));\n    assert(candidate(("x")) == (1));\n'
        '    assert(candidate(("asdasnakj")) == (9));\n}\n')


@pytest.mark.parametrize(("text", "stops", "expected"), [
    ("    return x\ndef g():\n", bench.HUMANEVAL_STOP, "    return x"),
    ("    return x\n#c\nif y:", bench.HUMANEVAL_STOP, "    return x"),  # earliest wins
    ("    if x:\n        return 1\nif y:", bench.HUMANEVAL_STOP, "    if x:\n        return 1"),
    ("    return x", bench.HUMANEVAL_STOP, "    return x"),  # no stop: all of it
    ("\ndef f(): pass", bench.HUMANEVAL_STOP, ""),
    ("    pass\n<|/ file", bench.MBPP_STOP, "    pass"),
    ("x = 1<|im_end|>junk", ["\nclass", "<|im_end|>"], "x = 1"),  # the EOS string stops too
])
def test_cut_at_stop(text, stops, expected):
    assert cut_at_stop(text, stops) == expected


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert 0 < pass_at_k(200, 3, 100) < 1  # the product form does not overflow
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 10)


def test_stop_criterion_waits_for_all_rows_only_when_told(tiny):
    _, tokenizer = tiny
    prompt = tokenizer("x = 1")["input_ids"]
    rows = [prompt + tokenizer("\n    return 1\ndef g")["input_ids"],
            prompt + tokenizer("\n    return 2 + 3")["input_ids"]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    stops = bench.HUMANEVAL_STOP
    together = StopStrings(tokenizer, len(prompt), stops, [100, 100], together=True)
    assert together(ids, None).tolist() == [False, False]
    per_row = StopStrings(tokenizer, len(prompt), stops, [100, 100], together=False)
    assert per_row(ids, None).tolist() == [True, False]
    out_of_budget = StopStrings(tokenizer, len(prompt), stops, [100, 3], together=True)
    assert out_of_budget(ids, None).tolist() == [True, True]


# ----------------------------------------------------------------------------- sandbox


@pytest.mark.shared_data
def test_known_solutions_pass_and_wrong_ones_fail():
    for language in ("python", "js", "cpp"):
        _needs(language)
    cases = [  # (benchmark, id, completion, should pass)
        ("humaneval", "HumanEval/0", "\n    return False\n", False),
        ("multiple-js", "HumanEval_23_strlen", "\n  return string.length;\n}", True),
        ("multiple-js", "HumanEval_85_add", "\n  let s = 0;\n  for (let i = 1; i < lst.length; "
         "i += 2) if (lst[i] % 2 === 0) s += lst[i];\n  return s;\n}", True),
        ("multiple-js", "HumanEval_85_add", "\n  return 0;\n}", False),
        ("multiple-cpp", "HumanEval_23_strlen", "\n    return string.size();", True),
        ("multiple-cpp", "HumanEval_85_add", "\n    long s = 0;\n    for (size_t i = 1; "
         "i < lst.size(); i += 2) if (lst[i] % 2 == 0) s += lst[i];\n    return s;", True),
        ("multiple-cpp", "HumanEval_85_add", "\n    return 0;", False),
    ]
    jobs = [Job(bench.LANGUAGES[name], bench.program(_item(name, qid), completion))
            for name, qid, completion, _ in cases]
    mbpp = _item("mbpp", "11")
    jobs += [Job("python", bench.reference_program(mbpp)), Job("python", bench.stub_program(mbpp))]
    verdicts = run_jobs(jobs, workers=2)
    expected = [ok for *_, ok in cases] + [True, False]
    assert [v.passed for v in verdicts] == expected, [(v.status, v.detail) for v in verdicts]
    assert all(v.status == "failed" for v, ok in zip(verdicts, expected, strict=True) if not ok)


@pytest.mark.shared_data
@pytest.mark.slow
def test_every_humaneval_and_mbpp_reference_passes_and_every_stub_fails():
    report = check_references(SHARED_DATA, ["humaneval", "mbpp"])
    for name, count in (("humaneval", 164), ("mbpp", 500)):
        references = report[name]["references"]
        assert (references["run"], references["passed"], references["not_passed"]) == (
            count, count, []), references
        assert report[name]["stubs"]["failed_as_expected"] == count, report[name]["stubs"]
        assert report[name]["status"] == "ok"


@pytest.mark.shared_data
@pytest.mark.slow
def test_the_check_references_command_exits_0_only_when_every_set_is_ok(monkeypatch, capsys):
    from evaluation.__main__ import main

    command = ["--task", "code", "--check-references", "--data-dir", str(SHARED_DATA),
               "--benchmarks", "humaneval"]
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out)["humaneval"]["status"] == "ok"
    monkeypatch.setitem(bench.KNOWN_UNSOLVABLE, "multiple-js", {})  # its broken problem: a failure
    assert main([*command[:-1], "multiple-js"]) == 1


@pytest.mark.shared_data
@pytest.mark.slow
def test_multiple_programs_are_well_formed():
    """No MultiPL-E references exist: every prompt + throwing body + tests must compile or
    parse, run into the stub and fail. Every JS program, and every 10th C++ one (g++ takes
    about a second each; `python -m evaluation --task code --check-references` checks all),
    with each set's known broken problem."""
    for language in ("js", "cpp"):
        _needs(language)
    cpp_ids = [i.qid for i in bench.load_items("multiple-cpp", SHARED_DATA)]
    report = check_references(SHARED_DATA, ["multiple-js"])
    report |= check_references(SHARED_DATA, ["multiple-cpp"],
                               problems={*cpp_ids[::10], "HumanEval_137_compare_one"})
    # The dataset's own bugs, one per language; listed, and known.
    js = report["multiple-js"]["stubs"]
    assert (js["run"], js["failed_as_expected"]) == (161, 160)
    assert [u["id"] for u in js["unexpected"]] == ["HumanEval_51_remove_vowels"]
    assert "SyntaxError" in js["unexpected"][0]["detail"]
    cpp = report["multiple-cpp"]["stubs"]
    assert (cpp["run"], cpp["failed_as_expected"]) == (18, 17)
    assert [u["id"] for u in cpp["unexpected"]] == ["HumanEval_137_compare_one"]
    assert cpp["unexpected"][0]["verdict"] == "compile_error"
    assert "Union_long_float_std_string" in cpp["unexpected"][0]["detail"]
    for name in ("multiple-js", "multiple-cpp"):
        assert report[name]["references"]["run"] == 0
        assert report[name]["status"] == "ok"


# ----------------------------------------------------------------------------- model


@pytest.mark.shared_data
def test_tiny_model_completions_flow_to_records(tiny):
    model, tokenizer = tiny
    items = [_item("humaneval", "HumanEval/129")]  # the longest prompt: the shortest budget
    seen = []
    outputs = {}
    for protocol in ("leaderboard", "robust", "leaderboard"):
        records = run_protocol(protocol, "humaneval", model, tokenizer, items,
                               Options(batch_size=2, progress=seen.append, workers=1))
        (record,) = records
        assert record.qid == "HumanEval/129" and record.prompt == bench.prompt(items[0])
        assert record.parsed == cut_at_stop(record.raw_output,
                                            [*bench.HUMANEVAL_STOP, tokenizer.eos_token])
        assert record.extra["program"] == bench.program(items[0], record.parsed, setup=True)
        assert record.extra["verdict"] in {"passed", "failed", "timeout", "error"}
        assert record.correct == (record.extra["verdict"] == "passed")
        assert summarize_extra(protocol, records)["verdicts"] == {record.extra["verdict"]: 1}
        outputs.setdefault(protocol, []).append(record.raw_output)
    assert seen == [1, 1, 1]
    assert outputs["leaderboard"][0] == outputs["leaderboard"][1]  # seeded per benchmark


@pytest.mark.shared_data
def test_robust_sampling_reports_pass_at_k_per_problem(tiny):
    model, tokenizer = tiny
    items = [_item("mbpp", "493")]  # the longest prompt: the shortest budget
    (record,) = run_protocol("robust", "mbpp", model, tokenizer, items,
                             Options(batch_size=2, samples=3, workers=1))
    assert record.extra["n"] == 3 and len(record.extra["samples"]) == 3
    assert record.extra["pass_at_k"] == {"pass@1": record.extra["c"] / 3}
    assert record.parsed == record.extra["samples"][0]["completion"]
    summary = summarize_extra("robust", [record])
    assert summary["samples"] == 3 and summary["pass_at_k"] == record.extra["pass_at_k"]


@pytest.mark.shared_data
def test_greedy_batches_equal_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    items = bench.load_items("multiple-js", SHARED_DATA, limit=3)  # prompts of unequal length
    prompts = [bench.prompt(i) for i in items]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) == 3
    stops = bench.stop_words(items[0])
    batched = completions(model, tokenizer, prompts, stops, 400, batch_size=3)
    alone = completions(model, tokenizer, prompts, stops, 400, batch_size=1)
    assert batched == alone  # padding, the shared cache and per-row budgets change nothing


@pytest.mark.shared_data
def test_missing_toolchain_is_not_available_before_generation(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setenv("PATH", str(tmp_path))  # no node, no g++ on this PATH
    items = bench.load_items("multiple-js", SHARED_DATA, limit=1)
    seen = []
    for name in ("multiple-js", "multiple-cpp"):
        with pytest.raises(NotAvailable, match=name):
            run_protocol("robust", name, model, tokenizer, items,
                         Options(progress=seen.append))
    assert seen == []  # nothing was generated
    report = check_references(SHARED_DATA, ["multiple-cpp"])
    assert report["multiple-cpp"]["status"] == "not run"
