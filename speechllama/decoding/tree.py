"""Tree verification: check several candidates per head in one decoder call (Medusa-style tree
attention), keep the longest verified path. Lossless: with exact agreement the output equals
greedy decoding token for token.

Each call feeds, per sequence, the last kept token (the root, not yet in the cache) followed by
the N candidate nodes of a static tree (:mod:`speechllama.decoding.tree_shape`); the tree
attention mask lets every node see the history, its ancestors and itself, and gives it the rope
position of its depth, i.e. the position it would have if its path were kept. Head 1 at a node
is what greedy would emit after that node's path, so:

- a node is *verified* when its token equals head 1's argmax at its parent and every ancestor
  is verified; siblings are distinct top-k tokens, so at most one child of a node verifies and
  the verified nodes form a single chain from the root;
- the call keeps that chain's tokens plus head 1's argmax at its deepest node (the bonus token,
  so at least one token per call), exactly the tokens greedy would have produced;
- the kept nodes' keys/values were computed at their true positions but sit at scattered slots:
  ``KVCache.copy_slots`` moves them to consecutive slots (slot == position again, for the trunk
  and for ``layer`` heads' cache layers alike) and ``truncate`` drops the rest;
- heads 2.. at the deepest kept node propose the next call's tree (top-n of each head).

The path search is vectorised over the batch and the tree; the strategy reads the device once
per call (one ``tolist`` of the kept tokens). Sequences advance by different amounts (ragged
acceptance): every row's slots and positions start at its own cache length.

With heads 2..K trained, a top-1 chain tree (``tree=(1, 1, 1)``) is exactly the paper's
verification decoding; wider trees buy more accepted tokens per call for a wider call.

Confidence-gated drafting (``draft_threshold`` P > 0, as in :mod:`.verify`): each call feeds
only the nodes whose chained confidence (the product of their path's candidate probabilities,
each the softmax probability its head gave it) is at least P, a pruned tree that changes from
call to call. A node's chained confidence never exceeds its parent's, so the kept nodes always
form a tree; batched, a node is fed when any live row keeps it. Which nodes are fed never
changes which are verified, so the output stays greedy's. Pruned trees are built once per node
set (``_Pruned``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from speechllama.decoding.base import DecoderModel, DecodingState, Strategy, draft_threshold
from speechllama.decoding.options import DecodingOptions
from speechllama.decoding.tree_shape import TreeShape, build_tree, tree_from_paths


@dataclass(frozen=True)
class _Tree:
    """A :class:`TreeShape` as index tensors on the decoding device (k = N + 1 nodes, L levels).

    ``level``/``rank`` (N,) locate each candidate in the (L, R) proposal grid: node i's token is
    the rank_i-th best of head level_i + 2."""

    shape: TreeShape
    mask: torch.Tensor  # (k, k) bool, ancestors and self
    ancestors: torch.Tensor  # (k, L + 1) long, node index at each depth of a node's path
    parents: torch.Tensor  # (k,) long, the root its own parent
    depths: torch.Tensor  # (k,) long
    level: torch.Tensor  # (N,) long
    rank: torch.Tensor  # (N,) long

    @classmethod
    def build(cls, shape: TreeShape, device: torch.device) -> _Tree:
        def as_long(values: list[int] | tuple[int, ...]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            shape=shape,
            mask=shape.mask().to(device),
            ancestors=shape.ancestors().to(device),
            parents=as_long(shape.parents),
            depths=as_long(shape.depths),
            level=as_long([len(p) - 1 for p in shape.paths[1:]]),
            rank=as_long([p[-1] for p in shape.paths[1:]]),
        )

    def propose(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, n, V) at each sequence's last kept position -> (B, L, R) token ids: the
        top R = widest level's candidates of heads 2..L + 1, best first."""
        widest = max(self.shape.widths, default=0)
        return logits[:, 1 : 1 + self.shape.depth].topk(widest, dim=-1).indices

    def confidence(self, logits: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """(B, k) log of each node's chained confidence (the root's 0): the sum over its path of
        log softmax probabilities of its candidates, ``proposals`` (B, L, R) from ``logits``
        (B, n, V) at the same position."""
        heads = logits[:, 1 : 1 + self.shape.depth].float().log_softmax(dim=-1)
        own = heads.gather(2, proposals)[:, self.level, self.rank]  # (B, N)
        nodes = torch.cat([own.new_zeros(own.shape[0], 1), own], dim=1)  # (B, k)
        return nodes @ self.mask.T.to(nodes.dtype)  # row i sums its ancestors and itself


class _Pruned:
    """The sub-trees of one full tree that confidence-gated drafting feeds, built once per set
    of kept nodes (a call costs a host read of that set, not a rebuild)."""

    def __init__(self, full: _Tree) -> None:
        self.full = full
        self.built: dict[tuple[int, ...], _Tree] = {}

    def __call__(self, keep: torch.Tensor) -> _Tree:
        """``keep`` (k,) bool, closed under ancestors (root included) -> that sub-tree."""
        nodes = tuple(i for i, kept in enumerate(keep.tolist()) if kept)
        tree = self.built.get(nodes)
        if tree is None:
            paths = [self.full.shape.paths[i] for i in nodes]
            tree = _Tree.build(tree_from_paths(paths), self.full.mask.device)
            self.built[nodes] = tree
        return tree


class TreeDecoder(Strategy):
    """Tree verification with exact agreement (candidate == head 1's argmax at its parent).

    ``options.tree`` = (n_2, n_3, ..) takes the top n_d candidates of head d under every node
    of the level above (Cartesian product, pruned to ``options.tree_max_nodes`` by rank sum:
    see :func:`build_tree`). The levels used are capped by the heads the prefill returns (K, or
    ``options.num_heads``): L = min(len(tree), n - 1), so a single-head model decodes greedily
    (one token per call) rather than failing. Per-batch state lives in ``state.scratch`` (per
    row) and ``state.shared`` (the tree).
    """

    name = "tree"

    def __init__(self, options: DecodingOptions) -> None:
        super().__init__(options)
        shape = tuple(options.tree)
        if options.num_heads is not None:
            if options.num_heads < 1:
                raise ValueError(f"num_heads={options.num_heads} must be at least 1")
            shape = shape[: options.num_heads - 1]
        if options.tree_max_nodes < 1:
            raise ValueError(f"tree_max_nodes={options.tree_max_nodes} must be at least 1")
        self.draft = draft_threshold(options)
        self.max_nodes = options.tree_max_nodes
        self.shape = build_tree(shape, self.max_nodes)
        # A model with fewer heads only shrinks the tree, so this bounds every call's width.
        self.lookahead = self.shape.width

    def start(
        self, model: DecoderModel, cache: Any, logits: torch.Tensor, state: DecodingState
    ) -> None:
        """Keep head 1's argmax of the prefill (B, 1, n, V) and take the first proposals from
        heads 2..L + 1 at the same position; drop tree levels the model has no heads for."""
        levels = min(self.shape.depth, logits.shape[2] - 1)
        shape = self.shape
        if levels < shape.depth:
            shape = build_tree(self.options.tree[:levels], self.max_nodes)
        if max(shape.widths, default=0) > logits.shape[-1]:
            raise ValueError(
                f"tree {self.options.tree} asks for more candidates than the vocabulary holds"
            )
        tree = _Tree.build(shape, logits.device)
        first = logits[:, 0, 0].argmax(dim=-1)  # (B,)
        state.accept_blocks(first[:, None], torch.ones_like(first))
        state.shared["tree"] = tree
        if self.draft > 0:
            state.shared["pruned"] = _Pruned(tree)
        state.scratch["last"] = first
        self._propose(tree, logits[:, 0], state)

    def _propose(self, tree: _Tree, at: torch.Tensor, state: DecodingState) -> None:
        """Proposals (and with drafting, each node's log confidence) from ``at`` (B, n, V)."""
        state.scratch["proposals"] = tree.propose(at)
        if self.draft > 0:
            state.scratch["confidence"] = tree.confidence(at, state.scratch["proposals"])

    def advance(self, model: DecoderModel, cache: Any, state: DecodingState) -> None:
        full: _Tree = state.shared["tree"]
        last: torch.Tensor = state.scratch["last"]  # (B,) last kept token, not in the cache
        proposals: torch.Tensor = state.scratch["proposals"]  # (B, L, R)
        B = last.shape[0]
        live = state.live_mask(last.device)
        tree = full
        if self.draft > 0:  # feed the nodes some live row is confident of
            sure = state.scratch["confidence"] >= math.log(self.draft)
            tree = state.shared["pruned"]((sure & live[:, None]).any(dim=0) | full.depths.eq(0))
        L = tree.shape.depth
        fed = torch.cat([last[:, None], proposals[:, tree.level, tree.rank]], dim=1)  # (B, k)
        fed = fed.masked_fill(~live[:, None], state.pad_id)

        before = cache.lengths.clone()
        # Heads 2..L_full + 1 propose the next call's (full) tree whatever this call feeds.
        n = full.shape.depth + 1
        logits = model.step(fed, cache, tree_mask=tree.mask, num_heads=n)  # (B, k, n, V)
        own = logits[:, :, 0].argmax(dim=-1)  # (B, k): what greedy emits after each node

        # Verified: own token == head 1 at the parent, for the node and all its ancestors.
        ok = fed == own[:, tree.parents]
        ok[:, 0] = True
        path_ok = ~(tree.mask[None] & ~ok[:, None, :]).any(dim=-1)  # (B, k)
        depth = torch.where(path_ok, tree.depths, -1)
        best = depth.argmax(dim=-1)  # (B,) the deepest verified node (unique: siblings differ)
        at = best[:, None]
        kept = depth.gather(1, at)[:, 0]  # (B,) candidates kept, 0..L
        path = tree.ancestors[best]  # (B, L + 1) node at each depth of best's path, root first
        bonus = own.gather(1, at)  # (B, 1)
        tokens = torch.cat([fed.gather(1, path)[:, 1:], bonus], dim=1)
        block = tokens.scatter(1, kept[:, None], bonus)  # (B, L + 1): kept candidates, bonus
        # A row that reaches its length limit keeps only what fits, so its cache never grows
        # past [audio][BOS] + limit and finished rows' padding calls stay inside ``lookahead``.
        count = torch.minimum(kept + 1, state.room(kept.device))

        # Compact the kept path into slots before .. before + kept (slot == position again), for
        # every cache layer (``layer`` heads' too), then drop the rest. Padding entries of
        # ``path`` copy a slot onto itself.
        steps = torch.arange(L + 1, device=before.device)
        cache.copy_slots(before[:, None] + path, before[:, None] + steps)
        cache.truncate(before + count)
        state.scratch["last"] = bonus[:, 0]
        self._propose(full, logits[torch.arange(B, device=best.device), best], state)
        state.accept_blocks(block, count)


STRATEGY = TreeDecoder
