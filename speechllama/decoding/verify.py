"""Verification-based multi-token decoding (blockwise parallel decoding, Stern et al. 2018;
Medusa's self-speculation): every decoder call both checks the previous call's proposals and
makes new ones, so it emits between 1 and n tokens.

One call, per sequence, with n heads:

    fed       = [y, p_1 .. p_{n-1}]        y: the last kept token (not yet in the cache),
                                           p_j: heads 2..n's proposals for the tokens after y
    g_j       = head 1's argmax at fed position j (j = 0..n-1): the model's own next token
                after [.. y p_1 .. p_j]
    a         = the longest prefix with p_j == g_{j-1} (``exact``) or p_j in head 1's top-N at
                position j - 1 (``topk``)
    emitted   = p_1 .. p_a, then g_a (the "bonus": at least one token per call)
    cache     = rolled back to y p_1 .. p_a (a position reset, ``cache.truncate``: nothing moves)
    proposals = heads 2..n at fed position a, i.e. for the tokens after the bonus

In ``exact`` mode every emitted token is head 1's argmax given exactly the tokens before it,
which is what greedy decoding emits: the output is greedy's, token for token. Causal attention
keeps the rejected proposals (fed after position a) from influencing positions <= a, and the
rollback makes their keys/values invisible to every later call.

Exactness in floating point: a call over n tokens computes the same function as n one-token
calls, but not the same floating-point operations (matmuls of n rows instead of 1, attention
over a wider key block), so logits differ in the last bits (measured: ~1e-6 relative in fp32 on
CPU). An argmax can only differ where head 1's two best logits are that close, which a trained
model practically never produces; the tests check the margin they rely on. ``topk`` mode is
lossy by design: it keeps a proposal head 1 ranks in its top N without being its first choice.

Batched: all rows feed the same n tokens and each keeps its own a (per-row cache lengths), so no
padding is needed; finished rows are fed padding and rolled back to where they were. All
comparisons are tensor ops over the whole batch; one host transfer per call brings the emitted
tokens back for ``DecodingState.accept`` (which handles EOS and the length limit).
"""

from __future__ import annotations

from typing import Any

import torch

from speechllama.decoding.base import (
    DecoderModel,
    DecodingState,
    Strategy,
    block_lookahead,
    heads_used,
)
from speechllama.decoding.options import DecodingOptions

MODES = ("exact", "topk")


class VerifyDecoder(Strategy):
    """Propose with heads 2..n, verify with head 1 in the next call; ``options.verify`` picks
    the check (``exact`` or ``topk`` with ``options.topk``), ``options.num_heads`` the n."""

    name = "verify"

    def __init__(self, options: DecodingOptions) -> None:
        super().__init__(options)
        if options.verify not in MODES:
            raise ValueError(f"verify mode {options.verify!r}; choose one of {', '.join(MODES)}")
        if options.verify == "topk" and options.topk < 1:
            raise ValueError(f"verify topk needs topk >= 1, got {options.topk}")
        self.lookahead = block_lookahead(options)

    def start(
        self, model: DecoderModel, cache: Any, logits: torch.Tensor, state: DecodingState
    ) -> None:
        """Prefill logits (B, 1, n, V): head 1's token is kept, heads 2..n propose the next."""
        heads_used(logits, self)
        first = logits[:, 0].argmax(dim=-1)  # (B, n)
        ones = torch.ones_like(first[:, 0])
        state.accept_blocks(first[:, :1], ones)
        state.scratch["last"] = first[:, 0]
        state.scratch["proposals"] = first[:, 1:]

    def advance(self, model: DecoderModel, cache: Any, state: DecodingState) -> None:
        last: torch.Tensor = state.scratch["last"]  # (B,)
        proposals: torch.Tensor = state.scratch["proposals"]  # (B, n - 1)
        n = proposals.shape[1] + 1
        live = state.live_mask(last.device)
        fed = torch.cat([last[:, None], proposals], dim=1)
        fed = fed.masked_fill(~live[:, None], state.pad_id)
        before = cache.lengths.clone()
        logits = model.step(fed, cache, num_heads=n)  # (B, n, n, V)

        own = logits[:, :, 0].argmax(dim=-1)  # (B, n): head 1 after each fed position
        if self.options.verify == "exact":
            ok = proposals == own[:, :-1]
        else:
            top = logits[:, :-1, 0].topk(self.options.topk, dim=-1).indices  # (B, n - 1, N)
            ok = (top == proposals[..., None]).any(dim=-1)
        kept = ok.long().cumprod(dim=1).sum(dim=1)  # (B,) proposals accepted
        at = kept[:, None]
        bonus = own.gather(1, at)  # (B, 1)
        block = torch.cat([proposals, bonus], dim=1).scatter(1, at, bonus)  # p_1..p_a, g_a
        count = (kept + 1) * live
        # heads 2..n at the last kept position propose the tokens after the bonus
        V = logits.shape[-1]
        rows = logits.gather(1, at[:, :, None, None].expand(-1, 1, n, V))[:, 0, 1:]
        state.scratch["last"] = bonus[:, 0]
        state.scratch["proposals"] = rows.argmax(dim=-1)
        cache.truncate(before + count)
        state.accept_blocks(block, count)


STRATEGY = VerifyDecoder
