"""What a run trains: the frozen parts, and head 1 kept fixed during heads-only training.

Heads-only training (``--freeze encoder adapter decoder``) exists to add or improve heads 2..K
of a trained model without changing what it transcribes: greedy decoding, and the check that
makes ``verify`` lossless, read head 1 alone. So in that mode head 1 is frozen too, unless
``train_head_one`` says otherwise (``TrainConfig.train_head_one``: None = frozen exactly when
the trunk is; True = trained with the other heads, and the model's greedy transcripts then
change; False = frozen in any mode). With tied embeddings head 1's output layer *is* the token
embedding, so freezing head 1 also freezes the embedding.

Head 1's parameters: ``heads.proj`` (the output layer, or the shared un-embedding U) for every
kind, and for ``latent`` heads also A_1, the first d rows of ``heads.maps`` (head 1 = U·A_1).
A row block of a parameter cannot leave the optimizer, so its gradient is zeroed by a hook (the
clipping norm never sees it) and its values are put back after every optimizer step (AdamW's
decoupled weight decay would otherwise shrink it). A new head kind whose head 1 reads more than
``proj`` must be added to :class:`HeadOnePin`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from speechllama.model.heads_latent import LatentHeads
from speechllama.train.config import TrainConfig
from speechllama.train.hidden import check_position_wise

TRUNK = ("encoder", "adapter", "decoder")


def heads_only(parts: Iterable[str]) -> bool:
    """True when ``parts`` (the ``--freeze`` list) freezes the whole trunk."""
    return set(TRUNK) <= set(parts)


def freeze_parts(model: nn.Module, parts: Iterable[str]) -> None:
    """No gradients for ``parts`` of ``model``, and eval mode (no dropout) for them."""
    for part in parts:
        module = getattr(model, part, None)
        if module is None:
            raise ValueError(f"--freeze {part}: this model has no {part}")
        if hasattr(module, "freeze"):
            module.freeze()  # an encoder pins its own eval mode
        module.requires_grad_(False)
        module.eval()


def wants_head_one_frozen(train_head_one: bool | None, parts: Iterable[str]) -> bool:
    """The ``train_head_one`` rule of the module docstring."""
    return not train_head_one if train_head_one is not None else heads_only(parts)


class HeadOnePin:
    """Keeps head 1 of ``heads`` exactly as it is now; call :meth:`restore` after every
    optimizer step."""

    def __init__(self, heads: nn.Module) -> None:
        heads.proj.weight.requires_grad_(False)
        self._rows: list[tuple[nn.Parameter, int, torch.Tensor]] = []
        if isinstance(heads, LatentHeads):
            d = heads.proj.in_features
            self._rows.append((heads.maps, d, heads.maps.detach()[:d].clone()))
            heads.maps.register_hook(lambda grad: _zero_leading_rows(grad, d))

    def restore(self) -> None:
        with torch.no_grad():
            for param, rows, saved in self._rows:
                param[:rows].copy_(saved)


def _zero_leading_rows(grad: torch.Tensor, rows: int) -> torch.Tensor:
    grad = grad.clone()
    grad[:rows] = 0
    return grad


@dataclass(frozen=True)
class RunPlan:
    """``pin``: head 1's keeper (None: head 1 trains); ``hidden``: train the heads on cached
    decoder hidden states (``train/hidden.py``); ``ctc_weight``: the CTC loss weight in use."""

    pin: HeadOnePin | None
    hidden: bool
    ctc_weight: float


def plan_run(cfg: TrainConfig, model: nn.Module) -> RunPlan:
    """Freeze what ``cfg`` freezes and decide how heads-only training runs; refuses what
    cannot work (``layer`` heads or a CTC loss on cached hidden states)."""
    freeze_parts(model, cfg.freeze)
    pin = HeadOnePin(model.heads) if wants_head_one_frozen(cfg.train_head_one, cfg.freeze) else None
    hidden = heads_only(cfg.freeze) and cfg.cache and cfg.hidden_cache
    has_ctc = model.ctc_head is not None
    if hidden:
        check_position_wise(model)
        if cfg.ctc_weight:
            raise ValueError(
                "--ctc-weight: heads-only training on cached hidden states has no encoder "
                "frames for CTC; drop it (the CTC head is not one of the heads) or pass "
                "--no-hidden-cache"
            )
        if has_ctc:
            model.ctc_head.requires_grad_(False)  # no loss reaches it
        return RunPlan(pin=pin, hidden=True, ctc_weight=0.0)
    # With the whole trunk frozen a CTC loss could only train its own head: off by default.
    default = 0.0 if heads_only(cfg.freeze) else 0.3 * has_ctc
    ctc_weight = cfg.ctc_weight if cfg.ctc_weight is not None else default
    if ctc_weight > 0 and not has_ctc:
        raise ValueError("--ctc-weight needs a model with a CTC head (this one has none)")
    return RunPlan(pin=pin, hidden=False, ctc_weight=ctc_weight)
