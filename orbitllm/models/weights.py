"""Filling a model's parameters from a checkpoint's Hugging Face-named tensors."""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from orbitllm.layers.weight_loading import CheckpointTensor, default_weight_loader
from orbitllm.models.errors import ModelLoadError

# Checkpoint name -> (the model's parameter name, shard id within it), or None: not used.
NameMap = Callable[[str], "tuple[str, object] | None"]

# Hugging Face's separate projections -> (our fused parameter, its shard id), the same in
# every family that fuses Q/K/V and gate/up.
STACKED_PROJECTIONS = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
# Checkpoint tensors our modules hold one level down: the KV scales (compressed-tensors'
# kv_cache_scheme) belong to the attention layer, ``self_attn.attn``.
RENAMED = {".self_attn.k_scale": ".self_attn.attn.k_scale", ".self_attn.v_scale": ".self_attn.attn.v_scale"}


def map_stacked_name(hf_name: str, tied_head: bool) -> tuple[str, object] | None:
    """A checkpoint name in our fused layout; None for what the model does not hold (a
    rotary buffer, the LM head where it is the embedding)."""
    if "rotary_emb" in hf_name:
        return None
    name = hf_name.removeprefix("model.")
    if name == "lm_head.weight" and tied_head:
        return None
    for frag, (fused, shard_id) in STACKED_PROJECTIONS.items():
        if f".{frag}." in name:
            return name.replace(frag, fused), shard_id
    for theirs, ours in RENAMED.items():
        if name.endswith(theirs):
            return name.removesuffix(theirs) + ours, None
    return name, None


def checkpoint_name(name: str) -> str:
    """Our parameter ``name`` as the checkpoint calls it where ``RENAMED`` moved it (less
    the ``model.`` prefix, as errors name every parameter)."""
    for theirs, ours in RENAMED.items():
        if name.endswith(ours):
            return name.removesuffix(ours) + theirs
    return name


def hf_module_names(name: str) -> list[str]:
    """The checkpoint modules our module ``name`` holds: several for a fused projection
    (``layers.0.self_attn.qkv_proj`` -> ``model.layers.0.self_attn.q_proj``, ...)."""
    base, _, last = name.rpartition(".")
    parts = [frag for frag, (fused, _) in STACKED_PROJECTIONS.items() if fused == last]
    return [f"model.{base}.{frag}" for frag in parts] if parts else [f"model.{name}"]


def load_checkpoint_weights(model: nn.Module, weights: Iterable[tuple[str, CheckpointTensor]],
                            source: str, map_name: NameMap) -> None:
    """Hand each checkpoint tensor, one at a time, to the weight loader of the layer that
    owns its parameter (``load_weight``; replicated parameters such as norms are copied
    whole). Every parameter, and every shard of a fused one, must be filled."""
    params = dict(model.named_parameters())
    loaded: set[tuple[str, object]] = set()
    for hf_name, tensor in weights:
        mapped = map_name(hf_name)
        if mapped is None:
            continue
        name, shard_id = mapped
        if name not in params:
            raise ModelLoadError(f"{source}: unexpected tensor {hf_name!r} for this architecture")
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        try:
            if hasattr(module, "load_weight"):
                module.load_weight(param_name, tensor, shard_id)
            else:
                default_weight_loader(params[name], tensor, shard_id)
        except ValueError as e:
            raise ModelLoadError(f"{source}: tensor {hf_name!r} {e}") from None
        loaded.add((name, shard_id))
    missing, partial = [], []
    for name in params:
        ids = getattr(model.get_submodule(name.rpartition(".")[0]), "shard_ids", (None,))
        got = sum((name, i) in loaded for i in ids)
        if got == 0:
            missing.append(checkpoint_name(name))
        elif got < len(ids):
            partial.append(name)
    if missing:
        raise ModelLoadError(f"{source}: checkpoint lacks weights for {sorted(missing)[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
    if partial:
        raise ModelLoadError(f"{source}: checkpoint lacks part of {sorted(partial)[:3]}")


class StackedDecoderHead:
    """The LM head and the checkpoint loading that decoder families with fused Q/K/V and
    gate/up share (Llama, Mistral, Qwen, Gemma 3): a mixin of their ``nn.Module``, which
    defines ``embed_tokens`` and ``lm_head`` (None where the head is the embedding)."""

    def compute_logits(self, hidden):
        """Logits of ``hidden``'s rows. Under tensor parallelism every rank must call
        this for the same rows; the full logits land on the driver (None elsewhere)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]], source: str) -> None:
        load_checkpoint_weights(self, weights, source, self._map_name)

    def _map_name(self, hf_name: str) -> tuple[str, object] | None:
        return map_stacked_name(hf_name, tied_head=self.lm_head is None)
