"""Which NVIDIA GPUs this machine has, found without importing torch: the launcher stays light,
and a client that Ray hid from the GPUs cannot ask CUDA about them."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

ALLOW_CPU_ENV = "FLOWERTUNE_ALLOW_CPU"
PROC_GPUS = Path("/proc/driver/nvidia/gpus")


def machine_gpus() -> int:
    """NVIDIA GPUs installed, whatever CUDA_VISIBLE_DEVICES says: `nvidia-smi -L`, else the
    driver's /proc entries."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        listing = None
    if listing is not None and listing.returncode == 0:
        return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    return len(list(PROC_GPUS.iterdir())) if PROC_GPUS.is_dir() else 0


def visible_gpus() -> int:
    """The GPUs a process started from here may use: the machine's, narrowed by
    CUDA_VISIBLE_DEVICES (CUDA reads it up to the first empty or -1 entry)."""
    gpus = machine_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    entries = (entry.strip() for entry in visible.split(","))
    return min(gpus, len(list(itertools.takewhile(lambda e: e not in ("", "-1"), entries))))


def gpus_per_client(requested: float | None) -> float:
    """The Ray GPUs each simulated client gets (`--gpus-per-client`).

    Ray hides every GPU from a client given none, and it then trains on CPU, so the default is
    a whole GPU wherever one is visible: one client per GPU at a time, each holding its cached
    model. A fraction f puts 1/f clients on a GPU, each with its own copy of the model (see
    docs/gpu.md for what fits). More than one GPU per client is refused: a client that sees
    two GPUs makes Trainer use DataParallel, which TRL refuses; and a GPU request on a machine
    without one would leave every client waiting for a GPU forever.
    """
    gpus = visible_gpus()
    if requested is None:
        return 1.0 if gpus else 0.0
    if not 0 <= requested <= 1:
        raise ValueError(f"--gpus-per-client {requested}: give a value from 0 to 1 (1: a whole "
                         "GPU per client, 0.5: two clients share one)")
    if requested > 0 and not gpus:
        raise ValueError(f"--gpus-per-client {requested} but no GPU is visible here "
                         "(nvidia-smi -L, CUDA_VISIBLE_DEVICES); use 0 to train on CPU")
    return requested


def check_not_hidden_from_gpus(torch_cuda: str | None) -> None:
    """Refuse to train on CPU on a machine with NVIDIA GPUs: a client Ray gave no GPU
    (`num-gpus = 0`), or a CPU-only torch (`torch_cuda`, torch.version.cuda, is None), would
    train a 7B model on CPU for hours without a word. FLOWERTUNE_ALLOW_CPU=1 allows it."""
    gpus = machine_gpus()
    if not gpus or os.environ.get(ALLOW_CPU_ENV) == "1":
        return
    if not visible_gpus():
        reason = (f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} hides them "
                  "(Ray gives a client no GPU when its num-gpus is 0); run through "
                  "`python -m flowertune_nlp.launch` (a GPU per client by default) or give "
                  "`flwr run` --federation-config client-resources-num-gpus=1")
    elif torch_cuda is None:
        reason = "this torch is a CPU-only build; install a CUDA build of torch"
    else:
        reason = (f"torch (built for CUDA {torch_cuda}) finds no usable GPU; check that the "
                  "driver nvidia-smi reports supports that CUDA version")
    raise RuntimeError(f"this machine has {gpus} NVIDIA GPU(s) but this process cannot use "
                       f"CUDA: {reason}. Set {ALLOW_CPU_ENV}=1 to train on CPU deliberately.")
