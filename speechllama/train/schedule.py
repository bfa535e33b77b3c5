"""The optimizer, and its learning-rate schedule: linear warmup, then cosine decay to a floor.

Warmup because Adam's early moment estimates are noisy and a fresh decoder diverges at full rate;
a floor (``min_ratio`` of the peak) rather than zero so that training past ``total_steps`` (for
example after raising ``--max-steps`` on resume) still learns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from speechllama.train.config import TrainConfig


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.05) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Rises linearly to 1.0 over ``warmup_steps`` (step 0 already gets 1/warmup, never zero, so the
    first update is not wasted), then follows half a cosine from 1.0 down to ``min_ratio`` at
    ``total_steps`` and stays there."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.05
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`warmup_cosine`; its state is just ``last_epoch`` (the step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio)
    )


def build_optimizer(
    cfg: TrainConfig, params: list[torch.nn.Parameter], encoder: Iterable[torch.nn.Parameter] = ()
) -> torch.optim.AdamW:
    """AdamW over the trained ``params``. Weight decay on matrices only: decaying gains and
    biases pulls them to 0 for nothing. Those of ``params`` that are also in ``encoder`` (the
    trained top blocks of a pretrained encoder, ``encoder.train_top``) get their own groups at
    ``encoder_lr_scale`` times the rate; runs without them keep the two groups that older
    checkpoints saved (optimizer states load by group)."""
    encoder_ids = {id(p) for p in encoder}
    groups = []
    for in_encoder in (False, True) if encoder_ids else (False,):
        part = [p for p in params if (id(p) in encoder_ids) == in_encoder]
        lr = cfg.lr * (cfg.encoder_lr_scale if in_encoder else 1.0)
        groups += [
            {"params": [p for p in part if p.dim() >= 2], "weight_decay": cfg.weight_decay,
             "lr": lr},
            {"params": [p for p in part if p.dim() < 2], "weight_decay": 0.0, "lr": lr},
        ]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
