"""The hypotheses of the beam searches and their candidate blocks: how one call's heads turn
into blocks of 1..n tokens per hypothesis (:func:`expand`) and how the next call's head 1
rescores a fed block (:func:`rescored`). Private to :mod:`speechllama.decoding.beam_search`,
which documents the choices (and re-exports these names)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["BeamHypothesis", "Candidates", "expand", "rescored"]


@dataclass(frozen=True)
class BeamHypothesis:
    """tokens: transcript tokens (no BOS/EOS); score: total log-probability, unnormalised (the
    sum of the log-probs of every scored token, EOS included when it ended the hypothesis);
    blocks: the tokens each decoder call scored for it, EOS included (its derivation: block i
    was scored by heads 1..len at the position before it); ended: by EOS (else by the length
    limit, or still open); provisional: the part of ``score`` that heads 2..j gave the last
    block's tokens 2..j, which head-1 rescoring replaces once the block is fed."""

    tokens: tuple[int, ...]
    score: float
    blocks: tuple[int, ...] = ()
    ended: bool = False
    provisional: float = 0.0

    @property
    def scored(self) -> int:
        return len(self.tokens) + int(self.ended)

    @property
    def pending(self) -> tuple[int, ...]:
        """The last block's tokens: an open hypothesis has them outside the cache."""
        return self.tokens[len(self.tokens) - self.blocks[-1] :] if self.blocks else ()

    def appended(self) -> list[int]:
        """Transcript tokens each call appended (the EOS that ended it is not a token)."""
        out = list(self.blocks)
        if out and self.ended:
            out[-1] -= 1
        return out


def rescored(
    rows: list[tuple[int, BeamHypothesis]], logits: torch.Tensor
) -> list[tuple[int, BeamHypothesis]]:
    """The hypotheses of ``rows`` with their last block rescored by head 1: logits (R, k, n, V)
    of the call that fed row r its pending block (k >= its length j) hold head 1's
    distribution after each fed token, so tokens 2..j of the block get head 1's log-probs in
    place of the ``provisional`` ones heads 2..j gave them. No extra decoder call: the call
    that extends a hypothesis verifies its last block, as ``verify`` does, and the score
    becomes head 1's teacher-forced log-prob of the hypothesis' tokens."""
    width = logits.shape[1]
    if width < 2:
        return rows
    targets = torch.zeros(len(rows), width - 1, dtype=torch.long)
    tails = [h.pending[1:] for _, h in rows]
    for r, tail in enumerate(tails):
        targets[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
    used = torch.arange(width - 1)[None] < torch.tensor([len(t) for t in tails])[:, None]
    logp = logits[:, :-1, 0].float().log_softmax(dim=-1)  # (R, k - 1, V)
    picked = logp.gather(2, targets.to(logp.device)[..., None])[..., 0].cpu()
    sums = picked.masked_fill(~used, 0.0).double().sum(dim=1).tolist()
    return [
        (o, dataclasses.replace(h, score=h.score - h.provisional + s, provisional=0.0))
        if len(h.pending) > 1
        else (o, h)
        for (o, h), s in zip(rows, sums, strict=True)
    ]


@dataclass(frozen=True)
class Candidates:
    """Every row's candidate blocks: scores (R, C) float (sum of the heads' log-probs, -inf for
    none), tokens (R, C, n) long (padded with -1), lengths (C,) long: C = W + (n - 1) W^2."""

    scores: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor


def expand(logp: torch.Tensor, width: int, eos_id: int) -> Candidates:
    """logp (R, n, V) log-probs of heads 1..n at each row's last position -> the candidate
    blocks of lengths 1..n from the top ``width`` tokens of each head (see the module doc)."""
    R, n, V = logp.shape
    w = min(width, V)
    top = logp.topk(w, dim=-1)  # (R, n, w)
    prefix_scores = logp.new_zeros(R, 1)
    prefix_tokens = torch.zeros(R, 1, 0, dtype=torch.long, device=logp.device)
    scores, tokens, lengths = [], [], []
    for j in range(n):
        P = prefix_scores.shape[1]
        s = (prefix_scores[:, :, None] + top.values[:, None, j]).reshape(R, P * w)
        new = top.indices[:, None, j, :, None].expand(R, P, w, 1)
        t = torch.cat([prefix_tokens[:, :, None].expand(R, P, w, j), new], dim=3)
        t = t.reshape(R, P * w, j + 1)
        scores.append(s)
        tokens.append(F.pad(t, (0, n - j - 1), value=-1))
        lengths.append(torch.full((P * w,), j + 1, dtype=torch.long, device=logp.device))
        if j + 1 < n:  # the best w prefixes that can grow: a block ends at its EOS
            open_scores = s.masked_fill(t[..., -1] == eos_id, -math.inf)
            best = open_scores.topk(min(w, P * w), dim=-1)
            prefix_scores = best.values
            prefix_tokens = t.gather(1, best.indices[..., None].expand(-1, -1, j + 1))
    return Candidates(torch.cat(scores, 1), torch.cat(tokens, 1), torch.cat(lengths))
