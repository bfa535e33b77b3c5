"""Training losses: cross-entropy over K multi-token heads, the auxiliary CTC loss, and the
per-head top-1 accuracy scored on the same positions.

Layout (shared with :meth:`SpeechLLaMA.forward`): the decoder reads ``tokens`` = [BOS] y_1..y_n
(U = n + 1 positions) and ``logits[:, u, k]`` predicts token ``u + k + 1`` of [BOS] y EOS. With
``labels`` = y_1..y_n EOS (also U positions) head k's target at position u is ``labels[u + k]``,
which exists only while ``u + k < n + 1``: later positions lie beyond EOS and carry no loss, as do
audio positions (the model returns text positions only) and padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass(frozen=True)
class HeadLoss:
    """``total`` = sum_k weight_k * mean CE of head k; ``per_head`` (K,) detached means;
    ``tokens`` (K,) how many target positions each head was scored on."""

    total: torch.Tensor
    per_head: torch.Tensor
    tokens: torch.Tensor


def head_targets(labels: torch.Tensor, label_lens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """labels (B, U) = y EOS right-padded, label_lens (B,) -> targets (B, U, K).

    ``targets[b, u, k] = labels[b, u + k]`` where ``u + k < label_lens[b]``, else ``IGNORE``."""
    length = labels.shape[1]
    padded = F.pad(labels, (0, num_heads - 1), value=IGNORE)
    # (B, U, K) view of the K shifted copies, without a Python loop over heads.
    targets = padded.unfold(1, num_heads, 1)[:, :length]
    pos = torch.arange(length, device=labels.device)[:, None] + torch.arange(
        num_heads, device=labels.device
    )
    valid = pos[None] < label_lens.to(labels.device)[:, None, None]
    return torch.where(valid, targets, torch.full_like(targets, IGNORE))


def multi_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_lens: torch.Tensor,
    weights: Sequence[float] = (),
) -> HeadLoss:
    """Weighted sum over heads of the token-mean cross-entropy, computed in fp32.

    logits (B, U, K, V) (any float dtype; upcast here so bf16 autocast never reaches the loss),
    labels (B, U) = y EOS right-padded, label_lens (B,). ``weights``: one per head, empty = 1.0.
    Each head is averaged over its own valid positions: head k sees k fewer targets per
    utterance, and a per-head mean keeps its weight meaning the same whatever the lengths."""
    _, _, num_heads, vocab = logits.shape
    w = list(weights) if weights else [1.0] * num_heads
    if len(w) != num_heads:
        raise ValueError(f"{len(w)} head loss weights for {num_heads} heads")
    targets = head_targets(labels, label_lens, num_heads)
    ce = F.cross_entropy(
        logits.float().reshape(-1, vocab),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(targets.shape)
    counts = (targets != IGNORE).sum(dim=(0, 1))
    means = ce.sum(dim=(0, 1)) / counts.clamp(min=1)
    total = (means * torch.tensor(w, dtype=means.dtype, device=means.device)).sum()
    return HeadLoss(total=total, per_head=means.detach(), tokens=counts)


def head_accuracy_counts(
    logits: torch.Tensor, labels: torch.Tensor, label_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 hits of each head on exactly the positions :func:`multi_token_loss` scores.

    logits (B, U, K, V), labels (B, U) = y EOS right-padded, label_lens (B,) -> (correct (K,),
    scored (K,)) as long tensors: head k is right at position u when its argmax equals
    ``labels[u + k]`` (EOS included), and scored only while that target exists. Counts, not
    fractions, so callers can pool them over batches of any size."""
    targets = head_targets(labels, label_lens, logits.shape[2])
    valid = targets != IGNORE
    hits = (logits.argmax(-1) == targets) & valid
    return hits.sum(dim=(0, 1)), valid.sum(dim=(0, 1))


def ctc_loss(
    logits: torch.Tensor,
    lens: torch.Tensor,
    targets: torch.Tensor,
    target_lens: torch.Tensor,
    blank: int = 0,
) -> torch.Tensor:
    """CTC on encoder frames: logits (B, T, V), lens (B,); targets (B, L) = y right-padded (no
    BOS/EOS), target_lens (B,). Blank is the pad id, which never occurs inside a transcript.

    Mean over the batch of per-utterance loss / target length (torch's ``mean``), in fp32;
    ``zero_infinity`` because an utterance with more tokens than frames has no alignment, and it
    should drop out of the batch instead of turning the loss into inf."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(
        log_probs,
        targets,
        lens.to(torch.long),
        target_lens.to(torch.long),
        blank=blank,
        reduction="mean",
        zero_infinity=True,
    )
