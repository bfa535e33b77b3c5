"""Static candidate trees for tree verification (Medusa-style tree attention).

A tree node is named by its *rank path* ``(r_1, .., r_d)``: take the r_1-th most likely token
of head 2, then the r_2-th most likely of head 3, ..., so a node at depth d is a guess for the
token d places after the bonus token (head k at the last accepted position predicts the token
k - 1 places after head 1's). The root, node 0, is the last accepted token itself; it is fed
with the candidates so that head 1 at the root checks the depth-1 guesses.

Construction (documented choice): ``DecodingOptions.tree = (3, 2, 1)`` means "top-3 of head 2,
top-2 of head 3, top-1 of head 4" and is expanded to the full Cartesian product of those ranks
(3 + 3·2 + 3·2·1 = 15 nodes). When the product is larger than ``max_nodes`` it is pruned by a
fixed prior that needs no calibration data: nodes are ranked by the sum of their ranks, then by
depth (the all-top-1 chain first, then paths with one second choice, ...), and the first
``max_nodes`` are kept. An ancestor always has a smaller key than its descendants, so the kept
set is a tree. Medusa's hand-tuned sparse trees (lists of rank paths chosen from measured head
accuracies) can be used as they are through :func:`tree_from_paths`.

Nodes are stored in breadth-first order (depth, then rank path), so a parent always precedes
its children and the first deepest verified node in index order is the most likely one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

Path = tuple[int, ...]


class TreeShapeError(ValueError):
    """A tree specification that cannot describe a candidate tree."""


@dataclass(frozen=True)
class TreeShape:
    """A candidate tree of N nodes plus the root; k = N + 1 tokens are fed per call.

    ``paths[i]`` is node i's rank path (the root's is ``()``); ``parents[i]`` its parent's
    index (the root is its own parent, which keeps indexing simple); ``depths[i]`` = len of its
    path. Per-level widths (``widths[d - 1]``, the most candidates any node takes from head
    d + 1) say how many top-k tokens each head must supply."""

    paths: tuple[Path, ...]

    def __post_init__(self) -> None:
        if not self.paths or self.paths[0] != ():
            raise TreeShapeError("a tree's first node must be the root, rank path ()")
        index = {p: i for i, p in enumerate(self.paths)}
        if len(index) != len(self.paths):
            raise TreeShapeError("a tree lists the same rank path twice")
        for i, p in enumerate(self.paths[1:], start=1):
            if any(r < 0 for r in p):
                raise TreeShapeError(f"rank path {p} has a negative rank")
            if index.get(p[:-1], i) >= i:
                raise TreeShapeError(f"rank path {p} comes before (or without) its parent")

    @property
    def num_nodes(self) -> int:
        """N, the candidates (root excluded)."""
        return len(self.paths) - 1

    @property
    def width(self) -> int:
        """k = N + 1, the tokens one call feeds per sequence."""
        return len(self.paths)

    @property
    def depth(self) -> int:
        """L, the deepest level: the call uses heads 1..L + 1."""
        return max(len(p) for p in self.paths)

    @property
    def widths(self) -> tuple[int, ...]:
        """Candidates needed from head d + 1 for d = 1..L (max rank + 1 at each depth)."""
        return tuple(
            1 + max(p[d - 1] for p in self.paths if len(p) >= d) for d in range(1, self.depth + 1)
        )

    @property
    def parents(self) -> tuple[int, ...]:
        index = {p: i for i, p in enumerate(self.paths)}
        return (0, *(index[p[:-1]] for p in self.paths[1:]))

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(p) for p in self.paths)

    def ancestors(self) -> torch.Tensor:
        """(k, L + 1) long: ``ancestors()[i, d]`` is node i's ancestor at depth d (itself at
        d = depth_i); past node i's depth it is ``d`` (an index whose slot copies onto itself
        when the path is compacted, so padding moves nothing that stays visible)."""
        index = {p: i for i, p in enumerate(self.paths)}
        rows = [
            [index[p[:d]] if d <= len(p) else d for d in range(self.depth + 1)] for p in self.paths
        ]
        return torch.tensor(rows, dtype=torch.long)

    def mask(self) -> torch.Tensor:
        """(k, k) bool tree attention mask: row i is True at node i's ancestors (root included)
        and at i itself, so each candidate sees exactly the path that would precede it; its row
        sum - 1 is its depth, which the model uses as its rope offset."""
        k = self.width
        out = torch.zeros(k, k, dtype=torch.bool)
        for i, p in enumerate(self.paths):
            out[i, [self.paths.index(p[:d]) for d in range(len(p) + 1)]] = True
        return out


def tree_from_paths(paths: Iterable[Sequence[int]]) -> TreeShape:
    """A tree from rank paths in any order (Medusa's ``choices`` format, e.g. ``[(0,), (1,),
    (0, 0)]``); the root is added and the nodes are put in breadth-first order. Every path's
    prefixes must be listed too."""
    nodes = sorted({tuple(int(r) for r in p) for p in paths if len(p)}, key=lambda p: (len(p), p))
    listed = set(nodes)
    for p in nodes:
        if len(p) > 1 and p[:-1] not in listed:
            raise TreeShapeError(f"rank path {p} is listed without its parent {p[:-1]}")
    return TreeShape(((), *nodes))


def cartesian_paths(shape: Sequence[int]) -> list[Path]:
    """Every rank path of the product tree: top ``shape[0]`` of head 2, then top ``shape[1]``
    of head 3 under each of them, ... -> sum over d of prod(shape[:d]) paths."""
    out: list[Path] = []
    for depth in range(1, len(shape) + 1):
        out.extend(itertools.product(*(range(n) for n in shape[:depth])))
    return out


def build_tree(shape: Sequence[int], max_nodes: int | None = None) -> TreeShape:
    """The tree ``DecodingOptions.tree`` describes: the Cartesian product of per-head top-n
    choices, pruned to the ``max_nodes`` nodes of smallest (rank sum, depth) when larger.

    ``shape`` = (n_2, n_3, ...) candidates of heads 2, 3, ...; an empty shape is the bare root
    (one token per call: greedy)."""
    shape = tuple(shape)
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in shape):
        raise TreeShapeError(f"tree shape {shape} must be positive integers (top-n per head)")
    if max_nodes is not None and max_nodes < 0:
        raise TreeShapeError(f"max_nodes={max_nodes} must not be negative")
    # Count before expanding, so a huge shape is pruned lazily instead of enumerated.
    total = sum(math.prod(shape[:d]) for d in range(1, len(shape) + 1))
    if max_nodes is None or total <= max_nodes:
        return tree_from_paths(cartesian_paths(shape))
    return tree_from_paths(_smallest_paths(shape, max_nodes))


def _smallest_paths(shape: Sequence[int], count: int) -> list[Path]:
    """The ``count`` product-tree paths of smallest (rank sum, depth, path), generated one rank
    sum at a time so that a huge shape never has its full product enumerated."""
    chosen: list[Path] = []
    for total in range(sum(n - 1 for n in shape) + 1):
        level = sorted(_paths_with_sum(shape, total), key=lambda p: (len(p), p))
        chosen.extend(level[: count - len(chosen)])
        if len(chosen) >= count:
            break
    return chosen


def _paths_with_sum(shape: Sequence[int], target: int) -> Iterable[Path]:
    """Non-empty product-tree paths whose ranks add up to ``target``."""

    def grow(prefix: Path, left: int) -> Iterable[Path]:
        if prefix and left == 0:
            yield prefix
        d = len(prefix)
        if d == len(shape):
            return
        for r in range(min(left, shape[d] - 1) + 1):
            yield from grow((*prefix, r), left - r)

    return grow((), target)
