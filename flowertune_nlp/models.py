"""Base models: resolve a name (hub id, local folder, GGUF file), load it, wrap it with LoRA.

Shared by training and evaluation so that both load a base model the same way.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from flowertune_nlp.adapter_fit import adapter_mismatch
from flowertune_nlp.config import LoraSettings
from flowertune_nlp.names import PACKAGE_PREFIX, is_local_reference, resolve_package_file

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(
    os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
) / "flowertune_nlp"


# bf16 rounds to 2^-9 of a value: under an eighth of the quantization step of any GGUF type that
# stores fewer than 7 bits per weight (4-bit: 1/64 of a step), but up to half a step of Q8_0.
BF16_SAFE_BITS_PER_WEIGHT = 7.0


def gguf_dequantized_dtype(gguf_path: Path) -> torch.dtype:
    """bf16 when it holds every tensor of the file as well as fp32 would for training: tensors
    quantized below 7 bits per weight, bf16 tensors, and fp32/fp16 ones (norms) whose values are
    exact in bf16 (true of models released in bf16). Anything else (8-bit, true fp32/fp16
    weights) keeps fp32. bf16 halves the converted folder: 15 GB instead of 30 GB for a 7B."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    for tensor in GGUFReader(gguf_path).tensors:
        kind = tensor.tensor_type
        if kind == GGMLQuantizationType.BF16:
            continue
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            values = np.asarray(tensor.data).astype(np.float32)
            if np.any(values.view(np.uint32) & 0xFFFF):  # mantissa bits bf16 does not have
                return torch.float32
            continue
        block, size = GGML_QUANT_SIZES[kind]
        if 8 * size / block >= BF16_SAFE_BITS_PER_WEIGHT:
            return torch.float32
    return torch.bfloat16


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors folder that Trainer and PEFT accept."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = gguf_dequantized_dtype(gguf_path)
    log.info("converting %s to %s safetensors in %s (once)", gguf_path, dtype, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype
    )
    # transformers 5 marks GGUF-loaded models as quantized and refuses to save them, although
    # the weights are already dequantized to dense tensors; drop that marker before saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_path(name: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> str:
    """Return what `from_pretrained` should load: a hub id or a local folder.

    A GGUF file is converted once into `cache_dir/gguf/<key>/`, keyed by path, size and mtime,
    under a file lock so that clients starting together convert it only once.
    """
    if name.startswith(PACKAGE_PREFIX):
        name = str(resolve_package_file(name))
    path = Path(name).expanduser()
    if path.suffix != ".gguf":
        return str(path.resolve()) if path.exists() else name
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_dir / "gguf" / f"{path.stem}-{key.hexdigest()[:12]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _convert_gguf(path, target)
    return str(target)


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fetch_base_model(name: str) -> str:
    """Resolve `model.name`, downloading a hub model into the local cache first (with
    progress), so that simulated clients, which share this machine's cache, load it from disk
    instead of each downloading it inside a round's timeout."""
    path = resolve_model_path(name)
    if path == name and not is_local_reference(name):
        from huggingface_hub import snapshot_download

        log.info("downloading %s into the Hugging Face cache (once)", name)
        snapshot_download(repo_id=name, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                         "*.txt", "*.tiktoken", "*.jinja"])
    return path


@dataclass(frozen=True)
class Precision:
    """What a process really computes in: device, bf16/fp16/fp32 compute, 4/8-bit base."""

    device: str
    compute: str
    quantization: int

    @property
    def bf16(self) -> bool:
        return self.compute == "bf16"

    @property
    def fp16(self) -> bool:
        return self.compute == "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute]

    def describe(self) -> str:
        weights = {0: "dense", 4: "nf4 4-bit", 8: "int8"}[self.quantization]
        return f"{self.device}, {weights} base, {self.compute} compute"


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels (AVX512-BF16/AMX); elsewhere bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_precision(requested: str, quantization: int) -> Precision:
    """Pick the compute precision the hardware offers for `model.precision`.

    "auto" takes bf16 only where it is native: `torch.cuda.is_bf16_supported()` also says yes
    on pre-Ampere GPUs, which emulate it slowly. There CUDA gets fp16 (with loss scaling in
    training), the usual QLoRA recipe for a T4 or V100; a CPU without native bf16 gets fp32.
    """
    if torch.cuda.is_available():
        device, bf16_ok = "cuda", torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        device, bf16_ok = "cpu", cpu_supports_bf16()
    if requested == "bf16" and not bf16_ok:
        raise RuntimeError(
            f"model.precision = 'bf16' but this {device} has no native bf16; use 'auto', "
            + ("'fp16' or 'fp32'" if device == "cuda" else "or 'fp32'")
        )
    if requested == "fp16" and device != "cuda":
        raise RuntimeError("model.precision = 'fp16' needs a CUDA GPU; on CPU use 'auto', "
                           "'bf16' or 'fp32'")
    if requested == "auto":
        requested = "bf16" if bf16_ok else "fp16" if device == "cuda" else "fp32"
    return Precision(device=device, compute=requested, quantization=quantization)


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # pad == eos lets padding masks hide the trained end-of-turn token; use a distinct
        # existing token (never a new one, which would resize the embeddings).
        vocab = tokenizer.get_vocab()
        candidates = (tokenizer.unk_token, "<|endoftext|>", "<pad>", tokenizer.bos_token)
        distinct = [t for t in candidates if t in vocab and vocab[t] != tokenizer.eos_token_id]
        tokenizer.pad_token = distinct[0] if distinct else tokenizer.eos_token
    return tokenizer


def load_base_model(model_path: str, precision: Precision):
    """Load the frozen base model for inference in the chosen precision (bitsandbytes for
    4/8-bit): embeddings, norms and LM head stay in the compute dtype. Training adds
    `prepare_for_training`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": precision.dtype}
    if precision.quantization == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=precision.dtype,
        )
    elif precision.quantization == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if precision.device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False
    return model


def prepare_for_training(model, precision: Precision, gradient_checkpointing: bool):
    """PEFT's k-bit training preparation of a 4/8-bit base: freeze it and upcast every
    non-quantized weight (embeddings, norms, LM head) to fp32 for stable training. That costs
    about 2 bytes per embedding/LM-head weight and an fp32 residual stream, so evaluation skips it.
    """
    if not precision.quantization:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def release_memory() -> None:
    """Free a dropped model now. bitsandbytes' 4-bit weights point back at their module, so a
    4-bit model is a reference cycle that only the cyclic collector frees, whenever it runs;
    until then its GPU memory stays held (and the caching allocator keeps it after that)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model, settings: LoraSettings):
    """Wrap a base model with a fresh LoRA adapter (adapters stay fp32 for stable updates)."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(settings))
    except ValueError as err:
        raise ValueError(
            f"model.lora.target-modules = {','.join(settings.target_modules)!r} does not match "
            f"this model's modules: {err}"
        ) from err


def _meta_lora_model(model_path: str, settings: LoraSettings):
    """The base model + LoRA built on the meta device from the config alone: no weights are
    read and no memory is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return add_lora(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path)),
                        settings)


def adapter_shapes(model_path: str, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the LoRA adapter for this base model."""
    from peft import get_peft_model_state_dict

    model = _meta_lora_model(model_path, settings)
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


def fresh_adapter(model_path: str, settings: LoraSettings, seed: int) -> dict:
    """A newly initialised LoRA adapter (PEFT's init: Kaiming-uniform A, zero B), fp32, without
    loading the base weights: only the LoRA tensors leave the meta device. The server needs
    nothing else of the model, so it never holds a copy of it.

    DoRA is the exception: PEFT starts each magnitude vector at the row norms of the base
    weight it adapts, so with `use-dora` the base model is loaded once, here, and freed."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    if settings.use_dora:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model = add_lora(base, settings)
    else:
        model = _meta_lora_model(model_path, settings)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    module.lora_A[name].to_empty(device="cpu")
                    module.lora_B[name].to_empty(device="cpu")
                    module.reset_lora_parameters(name, init_lora_weights=True)
    state = {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}
    del model
    release_memory()
    return state


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved key names, as fp32 on CPU (ArrayRecord goes
    through numpy, which has no bf16)."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu", torch.float32, copy=True)
        for k, v in get_peft_model_state_dict(model).items()
    }


def set_lora_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Overwrite every LoRA tensor; refuse a state with missing, extra, misshapen or
    non-finite tensors."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    reason = adapter_mismatch(state, get_peft_model_state_dict(model),
                              is_finite=lambda t: bool(torch.isfinite(t).all()))
    if reason:
        raise ValueError(f"adapter does not fit this model: {reason}")
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter keys not used by the model: {unexpected[:3]}")
