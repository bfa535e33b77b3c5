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
over a wider key block), so logits differ in the last bits: measured on the ``tiny`` preset in
fp32 on CPU, at most 5e-7 on logits of size ~1 (a few ulps). An argmax can only flip where head
1's two best logits are that close, which a trained model practically never produces; the tests
assert that the margin they rely on is >1e-3. The number of heads asked for adds no such
difference: every head kind computes head 1 with the same operations whatever n (bitwise, as
the tests check), which is why greedy may compute head 1 alone. ``topk`` mode is lossy by
design: it keeps a proposal head 1 ranks in its top N without being its first choice.

Batched: all rows feed the same n tokens and each keeps its own a (per-row cache lengths), so no
padding is needed; finished rows are fed padding and rolled back to where they were. A row's
cache never grows past [audio][BOS] + its length limit (the kept count is capped by what the
row may still append), so every call, padding calls of finished rows included, fits the n
slots the loop reserves beyond the limit. All
comparisons are tensor ops over the whole batch; the emitted tokens and counts come back to the
host once per call for ``DecodingState.accept`` (which handles EOS and the length limit).

Cost (measured on the shared 2-core CPU, one thread, ``tiny`` decoder with K = 4 latent heads,
V = 1024, ~85 positions of context): a 4-token call costs 1.09x a 1-token call at batch 1 and
1.27x at batch 8 (``small`` decoder: 1.22x and 1.64x); the bookkeeping here adds ~0.1 ms per
call at batch 1 and ~0.2 ms at batch 8 (greedy's: ~0.05 and ~0.12 ms). A batch makes as many
calls as its slowest row needs, so batched speed-ups are smaller than per-sequence call counts
suggest.

Confidence-gated drafting (``draft_threshold`` P > 0; bench method ``verify-exact@P``): a call
of w tokens costs more than a one-token call (``small`` on this CPU: about 1.46x at w = 4), and
most proposals of the later heads are rejected, so feeding all n - 1 of them in every call can
cost more than the accepted tokens save. With P > 0 the next call feeds y and only the longest
prefix p_1 .. p_m whose chained confidence (the product of heads 2..m+1's top probabilities at
the kept position) is at least P: w = m + 1, between 1 and n, per call. Which tokens are
proposed never changes what verification accepts as correct, so ``exact`` stays greedy's
output, token for token; only the number of calls and their widths change.

Batched, one width serves every row, and it is chosen for the batch: proposal j is fed when the
*mean* of its chained confidence over the live rows is at least P. Why the mean: widening a call
of B rows by one token costs the batch about P x (a one-token call), measured so by
``draft_threshold="auto"``, and a one-token call yields B tokens; the widening pays when the B
rows together expect at least P x B more tokens from it, which is that mean. At batch 1 it is the
rule above. (The widest row's width, the first rule tried, made batch-8 calls wider than the
other rows could use: 0.94x greedy at P = 0.1 on real-smoke, against 1.13x at batch 1.)
"""

from __future__ import annotations

from typing import Any

import torch

from speechllama.decoding.base import (
    DecoderModel,
    DecodingState,
    Strategy,
    block_lookahead,
    draft_threshold,
    fast_argmax,
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
        self.draft = draft_threshold(options)
        self.lookahead = block_lookahead(options)

    def start(
        self, model: DecoderModel, cache: Any, logits: torch.Tensor, state: DecodingState
    ) -> None:
        """Prefill logits (B, 1, n, V): head 1's token is kept, heads 2..n propose the next."""
        heads_used(logits, self)
        best = logits[:, 0].argmax(dim=-1)  # (B, n)
        state.accept_blocks(best, torch.ones_like(best[:, 0]))
        state.scratch["fed"] = best  # the next call feeds [y, p_1 .. p_{n-1}]
        if self.draft > 0:
            state.scratch["confidence"] = chained_confidence(logits[:, 0])

    def advance(self, model: DecoderModel, cache: Any, state: DecodingState) -> None:
        proposals: torch.Tensor = state.scratch["fed"]  # (B, n)
        B, n = proposals.shape
        live = state.live_mask(proposals.device) if any(state.finished) else None
        if live is not None:
            proposals = proposals.masked_fill(~live[:, None], state.pad_id)
        w = n
        if self.draft > 0:
            # One width for the batch (see the module docstring). Rows that would stop earlier
            # have their extra proposals verified like any other: exact stays exact.
            w = draft_width(state.scratch["confidence"], live, self.draft)
        fed = proposals[:, :w]
        before = cache.lengths.clone()
        logits = model.step(fed, cache, num_heads=n)  # (B, w, n, V)

        # Every head's token after every fed position: one argmax serves both the check (head
        # 1, all positions) and the next proposals (heads 2..n at the last kept position).
        best = fast_argmax(logits)  # (B, w, n)
        own = best[:, :, 0]  # g_0 .. g_{w-1}
        if self.options.verify == "exact":
            ok = fed[:, 1:] == own[:, :-1]
        else:
            # p_j is in head 1's top N at j - 1 when fewer than N logits beat its own (a rank
            # count: cheaper than topk, and it keeps ties with the N-th instead of picking one)
            head1 = logits[:, :-1, 0]  # (B, w - 1, V)
            mine = head1.gather(2, fed[:, 1:, None])
            ok = (head1 > mine).sum(dim=-1) < self.options.topk
        kept = ok.long().cumprod(dim=1).sum(dim=1)  # (B,) proposals accepted: a
        # [g_a, heads 2..n at a] is exactly the next call's [y, p_1 .. p_{n-1}]
        state.scratch["fed"] = best.gather(1, kept[:, None, None].expand(B, 1, n))[:, 0]
        if self.draft > 0:
            rows = torch.arange(B, device=kept.device)
            state.scratch["confidence"] = chained_confidence(logits[rows, kept])
        if self.options.verify == "exact":
            block = own  # p_1 .. p_a equal g_0 .. g_{a-1}, and g_a is the bonus
        else:  # p_1 .. p_a, then g_a
            first = torch.arange(w, device=fed.device)[None, :] < kept[:, None]
            block = torch.where(first, fed.roll(-1, dims=1), own)
        # The cache keeps y p_1 .. p_a, but never more than the row may still append: a row cut
        # by its length limit inside the block (or finished before) keeps only what fits, so
        # the padding calls it is fed afterwards stay inside the n slots reserved past the limit.
        count = torch.minimum(kept + 1, state.room(kept.device))
        cache.truncate(before + count)
        state.accept_blocks(block, count)


def chained_confidence(at: torch.Tensor) -> torch.Tensor:
    """(B, n - 1) confidence of proposals p_1 .. p_{n-1} from ``at`` (B, n, V: every head's
    logits at the last kept position): entry j is the product of heads 2..j+2's top
    probabilities, the chance that p_1 .. p_{j+1} are all right if the heads are calibrated."""
    return torch.softmax(at[:, 1:].float(), dim=-1).amax(dim=-1).cumprod(dim=1)


def draft_width(confidence: torch.Tensor, live: torch.Tensor | None, p: float) -> int:
    """The call's width, 1 + m: m = how many depths have a mean chained confidence over the live
    rows (``live`` (B,) bool, None: all) of at least ``p``. Along each row a chained
    confidence only falls, so the mean does too and the fed depths form a prefix."""
    if live is not None:
        if not bool(live.any()):
            return 1
        confidence = confidence[live]
    return 1 + int((confidence.mean(dim=0) >= p).sum())


STRATEGY = VerifyDecoder
