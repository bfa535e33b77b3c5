"""The search behind ``beam`` and ``prefix-beam``: hypotheses, candidate blocks, selection,
finished hypotheses and the beam's own KV cache. The two strategies differ only in how many
heads they read (``beam``: head 1; ``prefix-beam``: heads 1..n), so one engine serves both and
``prefix-beam`` with one head *is* ``beam``, call for call.

One call, per utterance with hypotheses h (each a cache row):

    fed        = h's last block (1..n tokens, not yet in the cache; ragged rows are padded and
                 rolled back by :func:`feed`)
    logp_k     = log-softmax of head k at the last fed position, k = 1..n
    candidates = blocks t_1..t_j, j = 1..n, t_k among the top W = beam + 1 tokens of head k;
                 score(h + block) = score(h) + sum_k logp_k(t_k)     (the heads' log-probs)
    keep       = walk all candidates of the utterance best first by the length-normalised score
                 (below): a block ending in EOS, or reaching the length limit, goes to the
                 finished pool; the others become the new hypotheses, until ``beam`` of them
    cache      = ``KVCache.reorder`` by parent row (the only copy; finished utterances' rows
                 leave in the same reorder)

Fixed choices (the paper leaves them open):

- **Candidates.** W = beam + 1 tokens of each head, combined depth by depth: the prefixes of
  length j are the top W non-EOS prefixes of length j - 1 times head j's top W. Blocks scored
  by a sum are separable, so this finds a row's best ``beam`` blocks of every length exactly
  (W = beam + 1 leaves room for one EOS); with one head it is the standard beam's top
  ``beam + 1`` per hypothesis. EOS only ends a block.
- **Length normalisation**: a hypothesis is ranked by ``score / L ** length_penalty``, L its
  scored tokens (transcript tokens plus the EOS that ended it): Hugging Face's form (1 = mean
  log-prob per token, 0 = raw log-prob), not GNMT's ``((5 + L) / 6) ** a`` (Wu et al. 2016).
  All open candidates of one ``beam`` call have the same L, so there it only ranks finished
  hypotheses; ``prefix-beam`` compares blocks of different lengths, which raw sums would always
  decide for the shortest.
- **Duplicates**: two candidates that reach the same token sequence (and the same status: still
  open, or finished) are one hypothesis with the **max** of their scores, not the log-sum-exp:
  they are two estimates of one sequence's log-probability (different heads scored the same
  tokens), not disjoint events whose probabilities add. The first seen is kept (the walk is
  best first), its cache row and pending block with it.
- **One path per slot**: an open candidate that is a prefix or an extension of an open one
  already kept for its utterance ("x" beside "x y z" from one parent, or a hypothesis lagging
  behind another on the same path) is passed over, so ``beam`` slots hold ``beam`` different
  paths; without it the beam of ``prefix-beam`` fills with one path at several lengths, which
  later merge as duplicates after costing calls. Measured on the tests' tiny K = 4 model (7
  utterances, beam 4): with ``length_penalty`` 1, 79 calls with the rule and 102 without
  (``beam`` 171, greedy 150); with 0 the rule costs calls instead (146 against 120), because
  raw sums rank "x" above "x y" and the rule then keeps only the short one. Same-length
  candidates are never nested, so ``beam`` is unaffected.
- **Finished candidates** enter the pool when they rank above the ``beam``-th open candidate
  kept in that call (the pool keeps the best ``beam``).
- **Stopping**: an utterance stops when it has no open hypothesis or when it holds ``beam``
  finished ones and no open hypothesis, ended now by an EOS of probability 1, would rank above
  the worst of them. With ``length_penalty = 0`` that is exact (log-probs only fall); above 0
  a longer hypothesis could still overtake, and this is the usual heuristic (fairseq's and
  Hugging Face's): the exact bound (at the length limit) would run nearly every utterance to
  its limit. With ``beam = 1`` and ``length_penalty = 0`` the search is greedy decoding.
- **Head-1 rescoring** (``prefix_rescore``; ``prefix-beam`` only, a no-op for ``beam``): the
  call that feeds a hypothesis' last block computes head 1 after each of its tokens, so before
  that call's pruning tokens 2..j of the block get head 1's log-probs instead of heads 2..j's
  (``rescored``; no extra call). Heads 2..j are overconfident on uncertain audio (on the tests'
  tiny model, one perturbed utterance's best hypothesis: heads -2.75, head 1 -141.7). A block
  may then end a hypothesis (EOS, or the length limit) only as one head-1 token, and every such
  ending enters the pool, not only those above the ``beam``-th open candidate (whose score
  still holds the heads' guess for its newest block). A finished hypothesis' score is then
  head 1's teacher-forced log-prob, the sequence score MWER trains. Off by default: measured on
  40 synth-heldout utterances at beam 4, it left WER as it was on one 4-head checkpoint (90.9%
  -> 90.5%, 2 of 496 words) and raised it on a weaker one (97.6% -> 103.0%, longer outputs),
  with 2-3% more decoder calls on both; on the tests' tiny model: token errors 46 -> 32.

Hypotheses advance by different numbers of tokens per call (``prefix-beam``), so a call feeds
ragged blocks, padded to the longest (:func:`feed`). Each utterance's search is independent of
the others in its batch.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch

from speechllama.decoding._beam_blocks import BeamHypothesis, Candidates, expand, rescored
from speechllama.decoding.base import DecoderModel, DecodingState, Strategy, feed
from speechllama.decoding.options import DecodingOptions

__all__ = [
    "BeamHypothesis",
    "BeamSearchStrategy",
    "Candidates",
    "SearchState",
    "expand",
    "normalised",
    "rescored",
]


def normalised(score: float, scored: int, length_penalty: float) -> float:
    """``score / scored ** length_penalty`` (scored tokens, at least 1)."""
    return score / max(scored, 1) ** length_penalty


@dataclass
class SearchState:
    """One batch's search (in ``DecodingState.shared``, keyed by rows' ``origin`` so the loop's
    compaction of its own rows cannot confuse it). ``rows[r]`` = (origin, hypothesis) of beam
    cache row r; ``pools`` the finished hypotheses per utterance (best ``beam`` kept);
    ``results`` each stopped utterance's finished hypotheses, best first."""

    heads: int
    cache: Any = None
    rows: list[tuple[int, BeamHypothesis]] = field(default_factory=list)
    pools: dict[int, dict[tuple[int, ...], BeamHypothesis]] = field(default_factory=dict)
    results: dict[int, list[BeamHypothesis]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Scored:
    """Every row's candidates on the host: ``order[r]`` candidate indices best first with their
    normalised scores ``norm[r]``; ``total[r][c]``, ``tokens[r][c]``, ``lengths[c]`` and
    ``provisional[r][c]`` (heads 2..j's share of the block's score) make candidate c of row r
    into a hypothesis."""

    norm: list[list[float]]
    order: list[list[int]]
    total: list[list[float]]
    provisional: list[list[float]]
    tokens: list[list[list[int]]]
    lengths: list[int]

    def hypothesis(self, parent: BeamHypothesis, r: int, c: int, eos_id: int) -> BeamHypothesis:
        """``parent`` (the hypothesis of row r) extended by candidate c; an EOS ends it."""
        j = self.lengths[c]
        block = self.tokens[r][c][:j]
        ended = block[-1] == eos_id
        toks = parent.tokens + tuple(block[: j - 1] if ended else block)
        blocks = (*parent.blocks, j)
        return BeamHypothesis(toks, self.total[r][c], blocks, ended, self.provisional[r][c])

    def best_first(self, rows: list[int]) -> Iterator[tuple[int, int]]:
        """(row, candidate) over ``rows``, best first (a merge of the rows' sorted lists),
        ending at the first candidate without a finite score (-inf: none; the rest are too)."""
        per_row = [zip([-x for x in self.norm[r]], repeat(r), self.order[r]) for r in rows]
        for neg, r, c in heapq.merge(*per_row):
            if not -neg > -math.inf:
                return
            yield r, c


def _nested(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether one of two token sequences is a prefix of the other."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


class BeamSearchStrategy(Strategy):
    """Beam search over blocks of up to n tokens (n = the heads this strategy reads).

    The loop's cache holds one row per utterance; ``start`` makes the beam's own cache from it
    (a shallow copy, then ``reorder`` into one row per hypothesis) and never reads the loop's
    cache again, so it sets ``own_cache`` and the loop skips compacting it (copies of a cache
    nobody reads: measured on a 4-head 6-layer d = 384 model, 40 synth-heldout utterances at
    batch 8, 16-20 copies and 12-16 ms of 4.0-5.8 CPU s, 0.3%). ``sink``, when given, receives
    every utterance's finished hypotheses (best first) in batch order at ``finalize``: that is
    how :func:`speechllama.decoding.nbest.nbest` reads N-best lists through the ordinary loop.
    """

    name = "beam-search"
    own_cache = True  # the loop's cache is idle after start: the loop leaves it uncompacted

    def __init__(
        self, options: DecodingOptions, sink: list[list[BeamHypothesis]] | None = None
    ) -> None:
        super().__init__(options)
        if options.beam_size < 1:
            raise ValueError(f"beam_size={options.beam_size} must be at least 1")
        self.beam = options.beam_size
        self.alpha = options.length_penalty
        self.rescore = options.prefix_rescore
        self.sink = sink

    def heads_read(self, logits: torch.Tensor) -> int:
        """The heads of the prefill logits (B, 1, n, V) this strategy scores blocks with."""
        return logits.shape[2]

    def start(
        self, model: DecoderModel, cache: Any, logits: torch.Tensor, state: DecodingState
    ) -> None:
        n = self.heads_read(logits)
        search = SearchState(heads=n)
        state.shared["beam"] = search
        live = state.live
        search.rows = [(state.origin[b], BeamHypothesis((), 0.0)) for b in live]
        if not live:
            return
        rows = torch.tensor(live, dtype=torch.long, device=logits.device)
        logp = logits[:, 0, :n].index_select(0, rows).float().log_softmax(dim=-1)
        search.cache = copy.copy(cache)  # reorder() replaces its tensors, not the loop's
        self._select(search, logp, live, state)

    def advance(self, model: DecoderModel, cache: Any, state: DecodingState) -> None:
        search: SearchState = state.shared["beam"]
        pending = [h.pending for _, h in search.rows]
        logits = feed(model, search.cache, pending, state.pad_id, num_heads=search.heads)
        if self.rescore:
            search.rows = rescored(search.rows, logits)
        last = torch.tensor([len(p) - 1 for p in pending], device=logits.device)
        at = logits[torch.arange(len(pending), device=logits.device), last]  # (R, n, V)
        self._select(search, at.float().log_softmax(dim=-1), list(range(len(pending))), state)

    def _select(
        self, search: SearchState, logp: torch.Tensor, cache_rows: list[int], state: DecodingState
    ) -> None:
        """Extend every hypothesis of ``search.rows`` (row r has logp[r] (n, V) and sits in
        cache row ``cache_rows[r]``), keep the best per utterance, reorder the cache."""
        scored = self._score(search, logp, state.eos_id)
        groups: dict[int, list[int]] = {}
        for r, (origin, _) in enumerate(search.rows):
            groups.setdefault(origin, []).append(r)
        where = {o: b for b, o in enumerate(state.origin)}
        new_rows: list[tuple[int, BeamHypothesis]] = []
        index: list[int] = []
        for origin, members in groups.items():
            b = where[origin]
            pool = search.pools.setdefault(origin, {})
            opened = self._extend(search, scored, members, state.max_tokens[b], pool, state.eos_id)
            if self._stopped(pool, [h for _, h in opened]):
                search.results[origin] = self._ranked(pool)
                state.finished[b] = True
                continue
            new_rows += [(origin, h) for _, h in opened]
            index += [cache_rows[r] for r, _ in opened]
        search.rows = new_rows
        if index and index != list(range(search.cache.batch_size)):
            search.cache.reorder(torch.tensor(index, dtype=torch.long))

    def _score(self, search: SearchState, logp: torch.Tensor, eos_id: int) -> _Scored:
        """Every row's candidates with their total and normalised scores (float64), sorted per
        row on the device, then read back once."""
        cand = expand(logp, self.beam + 1, eos_id)
        parents = torch.tensor([h.score for _, h in search.rows], dtype=torch.float64)
        lens = torch.tensor([len(h.tokens) for _, h in search.rows], dtype=torch.float64)
        total = parents.to(logp.device)[:, None] + cand.scores.double()  # (R, C)
        scored = lens.to(logp.device)[:, None] + cand.lengths.double()
        norm, order = (total / scored.clamp(min=1).pow(self.alpha)).sort(dim=1, descending=True)
        first = logp[:, 0].gather(1, cand.tokens[:, :, 0])  # head 1's log-prob of token 1
        provisional = cand.scores.double() - first.double()
        return _Scored(norm.tolist(), order.tolist(), total.tolist(), provisional.tolist(),
                       cand.tokens.tolist(), cand.lengths.tolist())  # fmt: skip

    def _extend(
        self,
        search: SearchState,
        scored: _Scored,
        members: list[int],
        limit: int,
        pool: dict[tuple[int, ...], BeamHypothesis],
        eos_id: int,
    ) -> list[tuple[int, BeamHypothesis]]:
        """One utterance (rows ``members``): walk its candidates best first; finished ones go
        to ``pool``, open ones are returned with their parent row, at most ``beam``. A
        candidate whose tokens equal one already walked is a duplicate (the first, best, copy
        stands); an open one on the same path as a kept one (a prefix or an extension of it:
        "x" and "x y z" from one parent, or a hypothesis lagging behind another) leaves its
        slot to another path, so that ``beam`` slots hold ``beam`` different paths."""
        opened: list[tuple[int, BeamHypothesis]] = []
        seen: set[tuple[tuple[int, ...], bool]] = set()
        for r, c in scored.best_first(members):
            hyp = scored.hypothesis(search.rows[r][1], r, c, eos_id)
            toks, j = hyp.tokens, hyp.blocks[-1]
            if len(toks) > limit:
                continue
            done = hyp.ended or len(toks) == limit
            if done and j > 1 and self.rescore:
                continue  # heads 2..j would score its end for good: it ends one token at a time
            if (toks, done) in seen:
                continue
            seen.add((toks, done))
            if done:
                self._pool_add(pool, hyp)
            elif not any(_nested(toks, h.tokens) for _, h in opened):
                opened.append((r, hyp))
                if len(opened) == self.beam:
                    break
        if self.rescore:  # see _pool_endings
            for r in members:
                self._pool_endings(search.rows[r][1], scored, r, limit, pool, eos_id)
        return opened

    def _pool_endings(
        self,
        parent: BeamHypothesis,
        scored: _Scored,
        r: int,
        limit: int,
        pool: dict[tuple[int, ...], BeamHypothesis],
        eos_id: int,
    ) -> None:
        """With rescoring, offer the pool every one-token ending of row r (head 1's EOS, or a
        token that reaches the limit), not only those that outrank the ``beam``-th open
        candidate: their scores are exact while open candidates carry the heads' guesses, which
        on uncertain audio outrank every ending, so that no hypothesis could finish before the
        limit. Only one-token blocks can end (``_extend``)."""
        for c, j in enumerate(scored.lengths):
            if j == 1 and scored.total[r][c] > -math.inf:
                hyp = scored.hypothesis(parent, r, c, eos_id)
                if hyp.ended or len(hyp.tokens) == limit:
                    self._pool_add(pool, hyp)

    def _ranked(self, pool: dict[tuple[int, ...], BeamHypothesis]) -> list[BeamHypothesis]:
        return sorted(pool.values(), key=lambda h: -normalised(h.score, h.scored, self.alpha))

    def _pool_add(self, pool: dict[tuple[int, ...], BeamHypothesis], hyp: BeamHypothesis):
        """Add a finished hypothesis (the better of two with the same tokens: one ended by EOS,
        the other by the limit), then keep the best ``beam``."""
        old = pool.get(hyp.tokens)
        if old is None or normalised(hyp.score, hyp.scored, self.alpha) > normalised(
            old.score, old.scored, self.alpha
        ):
            pool[hyp.tokens] = hyp
        if len(pool) > self.beam:
            worst = self._ranked(pool)[-1]
            del pool[worst.tokens]

    def _stopped(
        self, pool: dict[tuple[int, ...], BeamHypothesis], opened: list[BeamHypothesis]
    ) -> bool:
        if not opened:
            return True
        if len(pool) < self.beam:
            return False
        worst = min(normalised(h.score, h.scored, self.alpha) for h in pool.values())
        best = max(normalised(h.score, len(h.tokens) + 1, self.alpha) for h in opened)
        return best <= worst

    def finalize(self, state: DecodingState) -> list[tuple[int, ...]]:
        """The best finished hypothesis per row; its per-call block sizes become the row's
        ``accepted_per_call`` (the calls the utterance was charged after that hypothesis
        finished, while the search went on, count as calls that appended nothing)."""
        search: SearchState = state.shared["beam"]
        finals: list[tuple[int, ...]] = []
        lists: list[list[BeamHypothesis]] = []
        for b in range(state.batch_size):
            hyps = search.results.get(state.origin[b], [])
            lists.append(hyps)
            appended = hyps[0].appended() if hyps else []
            hist = [0] * (max(appended, default=0) + 1)
            for a in appended:
                hist[a] += 1
            hist[0] += state.calls[b] - len(appended)
            state.histogram[b] = hist
            finals.append(hyps[0].tokens if hyps else ())
        if self.sink is not None:
            self.sink.extend(lists)
        return finals
