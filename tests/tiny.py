"""Tiny random models for unit tests, built in-process (no hub, a few MB)."""

from __future__ import annotations

import json
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO_SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
# The 1,000-row sample: tests count its partitions and rows (the repo's data/samples holds 300).
ALPACA_SAMPLE = SHARED_DATA / "alpaca-gpt4" / "alpaca_en_demo.json"


def build_tokenizer(texts: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )


def build_tiny_model(target: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a random Llama-architecture model and a BPE tokenizer trained on the alpaca sample."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # data/samples holds the first 300 rows of the 1,000-row sample: the same tokenizer, from the
    # repository alone.
    rows = json.loads((REPO_SAMPLES / "alpaca-gpt4" / "alpaca_en_demo.json").read_text())[:300]
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in rows]
    texts += ["Answer the following multiple choice question. Options: A. B. C. D."]
    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
