"""Confidence-gated drafting in tree verification (``draft_threshold``): each call feeds the
sub-tree of nodes whose chained confidence clears the threshold for some live row; the output
stays greedy's whatever the threshold, and the bench spells it ``tree-draft@P``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import record_steps
from test_tree import LENS, _decode, _model

from speechllama.bench_methods import parse_methods
from speechllama.decoding import DecodingOptions, get_strategy
from speechllama.decoding.tree_shape import build_tree

torch.set_num_threads(1)
FULL = build_tree((3, 2, 1), 64).width  # the default tree: 16 tokens a call


def _fed(model, monkeypatch, rows=None, **opts):
    """(results, [(tokens fed, tree mask)] per step)."""
    seen = record_steps(model, monkeypatch, lambda tokens, _c, mask, _n: (tokens.shape[1], mask))
    out = _decode(model, rows, strategy="tree", **opts)
    monkeypatch.undo()
    return out, seen


@pytest.mark.parametrize("threshold", [1e-9, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["latent", "layer"])
def test_any_threshold_keeps_greedy_output(kind, threshold, monkeypatch):
    model = _model(kind)
    greedy = _decode(model, strategy="greedy")
    full, full_fed = _fed(model, monkeypatch)
    out, fed = _fed(model, monkeypatch, draft_threshold=threshold)
    assert [d.tokens for d in out] == [d.tokens for d in greedy]
    assert {w for w, _ in full_fed} == {FULL}
    assert all(1 <= w <= FULL for w, _ in fed)
    for w, mask in fed:  # every fed set is a tree: each node's ancestors are fed before it
        assert mask.shape == (w, w) and bool(mask.diagonal().all()) and bool(mask[:, 0].all())
        assert torch.equal(mask, mask.tril())
    if threshold == 1e-9:  # every node clears it: the full tree, call for call
        assert [d.accepted_per_call for d in out] == [d.accepted_per_call for d in full]
    else:
        assert sum(w for w, _ in fed) < sum(w for w, _ in full_fed)
    for b in range(len(LENS)):
        alone = _decode(model, [b], strategy="tree", draft_threshold=threshold)[0]
        assert alone.tokens == out[b].tokens


def _kept_node(mask: torch.Tensor, tokens: torch.Tensor, own: torch.Tensor, kept: int) -> int:
    """The fed node at depth ``kept`` whose every candidate on its path equals head 1's
    argmax at its parent (mask (k, k) ancestors and self; tokens, own (k,))."""
    depth = mask.sum(-1) - 1

    def parent(j: int) -> int:
        return max(q for q in range(j) if mask[j, q])

    def verified(i: int) -> bool:
        return all(tokens[j] == own[parent(j)] for j in range(1, i + 1) if mask[i, j])

    return next(i for i in range(mask.shape[0]) if depth[i] == kept and verified(i))


def test_fed_nodes_are_those_some_row_is_confident_of(monkeypatch):
    """One row: call i + 1 feeds exactly the nodes whose chained confidence, from call i's
    logits at the kept node, is at least P (the root always)."""
    model = _model("latent")
    threshold = 0.2
    tree = build_tree((3, 2, 1), 64)
    mask = tree.mask().float()
    level = torch.tensor([len(p) - 1 for p in tree.paths[1:]])
    rank = torch.tensor([p[-1] for p in tree.paths[1:]])
    checked = 0
    for b in range(len(LENS)):
        logged = []
        real_step = model.step

        def spy(tokens, cache, tree_mask=None, num_heads=None, log=logged, step=real_step):
            before = cache.lengths.clone()
            logits = step(tokens, cache, tree_mask, num_heads)
            log.append((tree_mask, before, logits, tokens))
            return logits

        monkeypatch.setattr(model, "step", spy)
        _decode(model, [b], strategy="tree", draft_threshold=threshold)
        monkeypatch.undo()
        for (m0, before, logits, tokens), (m1, after, _, _) in itertools.pairwise(logged):
            kept = int(after[0] - before[0]) - 1  # candidates kept by the earlier call
            node = _kept_node(m0, tokens[0], logits[0, :, 0].argmax(-1), kept)
            at = logits[0, node, 1:4].float()
            top = at.topk(3, dim=-1)
            logp = at.log_softmax(-1).gather(1, top.indices)[level, rank]
            conf = torch.cat([torch.zeros(1), logp]) @ mask.T
            want = int((conf >= math.log(threshold)).sum())
            assert m1.shape[0] == want
            checked += 1
    assert checked >= 5


def test_threshold_checked_and_bench_spelling():
    with pytest.raises(ValueError, match="draft threshold"):
        get_strategy(DecodingOptions(strategy="tree", draft_threshold=2.0))
    _, plain, gated = parse_methods("tree,tree-draft@0.10", DecodingOptions())
    assert plain.options.draft_threshold == 0.0
    assert (gated.name, gated.options.strategy, gated.options.draft_threshold) == (
        "tree-draft@0.1", "tree", 0.1)  # fmt: skip
    for bad in ("tree-draft", "tree-draft@0", "tree-draft@3"):
        with pytest.raises(ValueError, match="tree-draft"):
            parse_methods(bad, DecodingOptions())
