"""Low-rank deltas (LoRA) on the linear layers of a frozen pretrained decoder.

Why: the ``smollm`` preset's LLM is frozen and not stored in our checkpoints; adapting it to
transcripts after audio embeddings needs trainable decoder parameters that stay small. Each
targeted weight becomes W + (alpha / r)·B·A, with A (r, in) and B (out, r); B starts at zero, so
a fresh delta leaves the LLM exactly as it was. At r = 8 on all seven matrices of SmolLM2-135M's
30 layers that is 2.4M parameters (9.8 MB fp32).

Why not ``peft``: its LoRA wraps each ``nn.Linear`` in a module whose ``.weight`` is the *base*
weight, and our decoder reads ``.weight`` directly to multiply q|k|v and gate|up as one
(oneDNN-packed) matrix (``model/packed.py``), so peft's deltas would be silently skipped. A
``torch.nn.utils.parametrize`` parametrization instead makes ``.weight`` itself W + ΔW, so every
path (training, the packed decoding path, the heads) sees the adapted weight.

Inference merges the deltas into the weights once (:func:`merge_lora`): a decoder call then costs
what it cost without LoRA, instead of recomputing B·A for 210 matrices per call.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "LORA_TARGETS",
    "LowRankDelta",
    "add_lora",
    "is_lora_name",
    "lora_parameters",
    "merge_lora",
]

# Attribute names of the decoder's linear layers (``attn.*`` and ``mlp.*`` of every layer).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# State-dict names: a parametrized weight W lives at ``<linear>.parametrizations.weight.original``
# and its delta's factors at ``<linear>.parametrizations.weight.0.{A,B}``.
_ORIGINAL = ".parametrizations.weight.original"
_DELTA = ".parametrizations.weight.0."


class LowRankDelta(nn.Module):
    """weight (out, in) -> weight + scale·B·A. A (r, in) Kaiming-uniform, B (out, r) zero."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * (self.B @ self.A)).to(weight.dtype)


def add_lora(decoder: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
    """Parametrize every ``nn.Linear`` of ``decoder`` whose attribute name is in ``targets``.

    ``alpha`` <= 0 means alpha = rank (scale 1). The base weights keep their ``requires_grad``;
    the deltas are trainable."""
    unknown = set(targets) - set(LORA_TARGETS)
    if rank <= 0 or unknown:
        raise ValueError(
            f"LoRA needs rank > 0 and targets among {LORA_TARGETS}; got {rank}, {targets}"
        )
    scale_alpha = alpha if alpha > 0 else float(rank)
    for module in list(decoder.modules()):
        for name in targets:
            linear = getattr(module, name, None)
            if isinstance(linear, nn.Linear) and not parametrize.is_parametrized(linear, "weight"):
                out_f, in_f = linear.weight.shape
                delta = LowRankDelta(out_f, in_f, rank, scale_alpha)
                delta.to(device=linear.weight.device, dtype=linear.weight.dtype)
                parametrize.register_parametrization(linear, "weight", delta)


def is_lora_name(name: str) -> bool:
    """True for the state-dict name of a LoRA factor (trained, stored in checkpoints)."""
    return _DELTA in name


def base_name(name: str) -> str:
    """A parametrized weight's state-dict name -> the plain ``<linear>.weight`` name."""
    return name.replace(_ORIGINAL, ".weight")


def lora_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The LoRA factors inside ``module``."""
    for name, p in module.named_parameters():
        if is_lora_name(name):
            yield p


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Fold every delta into its weight (W <- W + scale·B·A) and drop the parametrization, for
    inference; returns how many were merged. The model can no longer be trained or saved as a
    LoRA checkpoint afterwards (its config still names the rank): load a fresh copy for that."""
    merged = 0
    for sub in list(module.modules()):
        if isinstance(sub, nn.Linear) and parametrize.is_parametrized(sub, "weight"):
            parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)
            merged += 1
    return merged
