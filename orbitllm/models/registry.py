"""Which class runs which Hugging Face architecture (``config.architectures``).

Each entry names a module under ``orbitllm.models`` and a class in it; the module is
imported only when a model of that architecture is built. Adding a family is a new
model file and one line here.
"""
from __future__ import annotations

import importlib

from orbitllm.models.errors import ModelLoadError

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def is_supported(architecture: str) -> bool:
    return architecture in _MODELS


def architecture_of(config, source: str) -> str:
    """The first of the config's architectures that a model class runs."""
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in _MODELS:
            return arch
    raise ModelLoadError(f"{source}: unsupported architecture {archs or None}; "
                         f"supported: {', '.join(supported_architectures())}")


def model_class(architecture: str) -> type:
    """The class (a ``models.interface.CausalLM``) registered for ``architecture``."""
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(f"orbitllm.models.{module}"), name)
