"""The cache's visibility rule against its definition, element by element."""

from __future__ import annotations

import pytest
import torch

from speechllama.model.kv_cache import cached_attention_mask


@pytest.mark.parametrize("k, tree", [(1, False), (5, False), (5, True), (40, False)])
def test_cached_attention_mask_is_history_plus_the_slots_each_token_may_see(k, tree) -> None:
    g = torch.Generator().manual_seed(k)
    B, width = 3, 64
    lengths = torch.tensor([0, 7, 20])
    # distinct slots at or past each history (scattered, as tree candidates can be)
    slots = torch.stack([n + torch.randperm(width - 20, generator=g)[:k] for n in lengths])
    tree_mask = None
    if tree:
        tree_mask = (torch.rand(B, k, k, generator=g) < 0.4) | torch.eye(k, dtype=torch.bool)
    got = cached_attention_mask(lengths, slots, tree_mask, width)
    sees = tree_mask if tree else torch.ones(k, k, dtype=torch.bool).tril().expand(B, k, k)
    want = torch.zeros(B, k, width, dtype=torch.bool)
    for b in range(B):
        for i in range(k):
            for w in range(width):
                written = [j for j in range(k) if int(slots[b, j]) == w]
                want[b, i, w] = w < lengths[b] or any(bool(sees[b, i, j]) for j in written)
    assert torch.equal(got, want)
    assert cached_attention_mask(lengths, slots, tree_mask).shape[-1] == int(slots.max()) + 1
