"""`python -m flowertune_nlp.export`: a saved adapter merged into its base model
(`merge_and_unload`), written as a full model folder that `transformers` loads without PEFT
(and vLLM, lm-eval's `pretrained=`, the Hub)."""

from __future__ import annotations

import sys
from pathlib import Path

from flowertune_nlp.cli import ArgumentParser
from flowertune_nlp.io import atomic_write_dir


def export_merged(peft_path: Path, output: Path, dtype: str = "auto") -> Path:
    """Load base + adapter as the adapter's config names them, merge, save model, tokenizer and
    the adapter's model card into `output` (atomically: a failed export leaves nothing)."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    if not (peft_path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--peft-path {peft_path} has no adapter_config.json; pass a "
                                "peft_<round> folder of a run")
    if output.exists():
        raise FileExistsError(f"--output {output} exists; choose a new folder")
    dtypes = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16,
              "fp16": torch.float16}
    model = AutoPeftModelForCausalLM.from_pretrained(str(peft_path), dtype=dtypes[dtype])
    tokenizer = AutoTokenizer.from_pretrained(model.peft_config["default"].base_model_name_or_path)
    merged = model.merge_and_unload()

    def fill(staging: Path) -> None:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        card = peft_path / "README.md"
        if card.is_file():
            (staging / "README.md").write_text(card.read_text().replace(
                "library_name: peft", "library_name: transformers", 1))

    atomic_write_dir(output, fill)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m flowertune_nlp.export", description=__doc__)
    parser.add_argument("--peft-path", required=True, help="an adapter folder (peft_<round>)")
    parser.add_argument("--output", required=True, help="the merged model folder to write")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="weights' dtype (auto: the base model's own)")
    args = parser.parse_args(argv)
    try:
        path = export_merged(Path(args.peft_path).expanduser(), Path(args.output).expanduser(),
                             args.dtype)
    except (FileNotFoundError, FileExistsError, OSError, ValueError) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"merged model: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
