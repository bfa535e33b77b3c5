"""The static, position-indexed KV cache of cached decoding, and its one visibility rule.

The cache is preallocated once per batch and a token's key/value slot equals its absolute
position, so rolling back rejected tokens is setting a length (no copies) and a ragged batch is
just per-sequence lengths. Visibility is decided by an explicit mask built from those lengths and
the slots written in the current call (:func:`cached_attention_mask`), so whatever stale values
sit beyond a sequence's length can never leak into attention.

Shapes: B batch, k new tokens, G key/value heads, D head dim, W attended cache width.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values for every layer, ``(layers, B, G, max_len, D)``.

    ``lengths`` (B,) long counts the valid positions of each sequence: slots ``< lengths[b]``
    are history, everything else is scratch that is never attended to unless the current call
    writes it. Rollback is :meth:`truncate`; it moves no data.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        index: torch.Tensor | None = None,
    ) -> None:
        """Store k, v (B, G, T, D) of one layer at per-sequence slots (B, T). ``index``: the
        scatter index (:meth:`write_index`) when the caller built it once for every layer."""
        if index is None:
            index = self.write_index(slots)
        self.k[layer].scatter_(2, index, as_dtype(k, self.k.dtype))
        self.v[layer].scatter_(2, index, as_dtype(v, self.v.dtype))

    def write_index(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (B, T) -> the (B, G, T, D) scatter index of :meth:`write`."""
        _, _, G, _, D = self.k.shape
        return slots[:, None, :, None].expand(-1, G, -1, D)

    def read(self, layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, G, width, D) of the first ``width`` slots: attending over only the
        needed prefix instead of ``max_len`` is what keeps CPU decoding cheap."""
        return self.k[layer, :, :, :width], self.v[layer, :, :, :width]

    def truncate(self, new_lengths: torch.Tensor | int) -> None:
        """Roll back: keep the first ``new_lengths[b]`` positions of each sequence.

        Growing is refused because it would expose slots that hold stale values."""
        new = torch.as_tensor(new_lengths, dtype=torch.long, device=self.lengths.device)
        new = new.expand_as(self.lengths)
        if bool(((new < 0) | (new > self.lengths)).any()):
            raise ValueError(
                f"truncate to {new.tolist()} is outside 0..current lengths {self.lengths.tolist()}"
            )
        self.lengths = new.clone()

    def reset(self) -> None:
        self.lengths = torch.zeros_like(self.lengths)

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Select or duplicate sequences (beam search): new row i is old ``batch_indices[i]``.

        Copies only the slots below the longest current length: the rest is scratch. New
        tensors, never an in-place shuffle, so a shallow copy of this cache keeps its rows.
        The scratch is zeros rather than uninitialised memory: a ragged batch attends over
        (masked) slots of its shorter rows that nobody has written yet, and masked garbage that
        happens to be NaN would still poison the softmax-weighted sum."""
        idx = batch_indices.to(device=self.k.device, dtype=torch.long)
        width = int(self.lengths.max()) if self.lengths.numel() else 0
        L, _, G, T, D = self.k.shape
        k = self.k.new_zeros(L, idx.numel(), G, T, D)
        v = self.v.new_zeros(L, idx.numel(), G, T, D)
        if width:
            k[:, :, :, :width] = self.k[:, :, :, :width].index_select(1, idx)
            v[:, :, :, :width] = self.v[:, :, :, :width].index_select(1, idx)
        self.k, self.v = k, v
        self.lengths = self.lengths.index_select(0, idx)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move entries (all layers) from slots ``src`` (B, n) to ``dst`` (B, n).

        For tree verification: the accepted path's tokens sit at scattered slots but were
        encoded at rope positions ``lengths + depth``; copying them to those slots restores the
        slot == position invariant before truncating."""
        L, B, G, _, D = self.k.shape
        gather = src[None, :, None, :, None].expand(L, B, G, -1, D)
        scatter = dst[None, :, None, :, None].expand(L, B, G, -1, D)
        k, v = self.k.gather(3, gather), self.v.gather(3, gather)
        self.k.scatter_(3, scatter, k)
        self.v.scatter_(3, scatter, v)


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without the dispatch when it is already ``dtype`` (about 2 us a call, and
    a decoder call has dozens of them)."""
    return x if x.dtype == dtype else x.to(dtype)


def cached_attention_mask(
    lengths: torch.Tensor,
    slots: torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Which cache slots each new token of a cached call sees -> (B, k, W) bool, True = visible.

    The one visibility rule of the cache, shared by :meth:`LlamaDecoder.forward_cached` and
    anything else that attends over the same cache in the same call (the ``layer`` heads'
    blocks), so their attention cannot drift apart: history slots ``< lengths`` (B,), plus the
    new slots ``slots`` (B, k) that the token's row of ``tree_mask`` (k, k) or (B, k, k) allows
    (default causal). ``width`` W is the attended cache prefix; by default the smallest that
    holds every history and new slot. A caller that already read the maxima back passes it, so
    the call costs no second host sync."""
    B, k = slots.shape
    if width is None:
        width = int(torch.maximum(lengths.max(), slots.max() + 1))
    keys = torch.arange(width, device=slots.device)
    visible = keys < lengths[:, None, None]  # (B, 1, W)
    if tree_mask is None:
        tree_mask = torch.ones(k, k, dtype=torch.bool, device=slots.device).tril()
    new = tree_mask.to(device=slots.device, dtype=torch.bool).expand(B, k, k)
    # token i sees slot w if a new token j it may see is written there: seen[b, i, slots[b, j]]
    # = new[b, i, j], a scatter (slots are distinct within a call). O(B k^2), where comparing
    # every slot with every key was O(B k^2 W): 1.2 ms against 40 us for an 84-token prefill.
    index = slots[:, None, :].expand(B, k, k)
    seen = torch.zeros(B, k, width, dtype=torch.bool, device=slots.device).scatter_(2, index, new)
    return visible | seen
