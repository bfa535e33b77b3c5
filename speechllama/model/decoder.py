"""LLaMA-style decoder with a static, position-indexed KV cache.

The cache is preallocated once per batch and a token's key/value slot equals its absolute
position, so rolling back rejected tokens is setting a length (no copies) and a ragged batch is
just per-sequence lengths. Visibility is decided by an explicit mask built from those lengths and
the slots written in the current call, so whatever stale values sit beyond a sequence's length
can never leak into attention.

Shapes: B batch, T / k new tokens, H query heads, G key/value heads, D head dim, W attended
cache width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechllama.model.config import DecoderConfig


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

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, G, T, D) of one layer at per-sequence slots (B, T)."""
        index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[layer].scatter_(2, index, k.to(self.k.dtype))
        self.v[layer].scatter_(2, index, v.to(self.v.dtype))

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
        """Select or duplicate sequences (beam search): new row i is old ``batch_indices[i]``."""
        idx = batch_indices.to(device=self.k.device, dtype=torch.long)
        self.k = self.k.index_select(1, idx)
        self.v = self.v.index_select(1, idx)
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


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the activation dtype (as LLaMA does), so that bf16
    training and fp16 inference keep the normalisation exact."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, D) for rope positions (B, T), in the "halves" layout of HF LLaMA.

    Computed per call in float32 (a few thousand flops) rather than kept as a buffer, so that
    ``model.to(bfloat16)`` cannot silently lower the frequencies' precision."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim)
    )
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D); cos, sin (B, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        layer: int = 0,
        slots: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, d). Without a cache: causal self-attention over x. With one: write this
        call's keys/values at ``slots`` (B, T), then attend over the first ``mask.shape[-1]``
        cache slots under ``mask`` (B, T, W), True = visible."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is not None:
            assert slots is not None and mask is not None
            cache.write(layer, slots, k, v)
            k, v = cache.read(layer, mask.shape[-1])
            k, v = k.to(q.dtype), v.to(q.dtype)
        repeat = self.n_heads // self.n_kv_heads
        if repeat > 1:  # grouped-query attention: kv head g serves query heads g*r .. g*r+r-1
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        p = self.dropout if self.training else 0.0
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=p)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], **cached
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rope, **cached))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


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
    visible = (keys[None, None, :] < lengths[:, None, None]).expand(B, k, width)
    if tree_mask is None:
        tree_mask = torch.ones(k, k, dtype=torch.bool, device=slots.device).tril()
    new = tree_mask.to(device=slots.device, dtype=torch.bool).expand(B, k, k)
    return visible.clone().scatter_(2, slots[:, None, :].expand(B, k, k), new)


class LlamaDecoder(nn.Module):
    """Token embedding, ``n_layers`` pre-norm blocks, final RMSNorm. Returns hidden states; the
    output layer lives in :mod:`speechllama.model.heads` (tied to ``embed`` when configured)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        for module in self.modules():  # LLaMA's init: N(0, 0.02) keeps tied logits small
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` positions."""
        if not 1 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} is outside 1..{self.cfg.max_seq_len}")
        weight = self.embed.weight
        c = self.cfg
        return KVCache(
            c.n_layers, batch_size, c.n_kv_heads, max_len, c.head_dim,
            dtype=dtype or weight.dtype, device=device or weight.device,
        )  # fmt: skip

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """Causal pass over input embeddings x (B, T, d) at positions 0..T-1 -> hidden (B, T, d).

        Right padding needs no mask: under causal attention no real position sees a pad."""
        B, T, _ = x.shape
        if self.cfg.max_seq_len < T:
            raise ValueError(
                f"sequence of {T} positions exceeds max_seq_len={self.cfg.max_seq_len}"
            )
        positions = torch.arange(T, device=x.device).expand(B, T)
        rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for block in self.layers:
            x = block(x, rope)
        return self.norm(x)

    def forward_cached(
        self,
        x: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run k new input embeddings x (B, k, d) against the cache -> hidden (B, k, d).

        ``slots`` (B, k): where each new token's keys/values are written; they should lie at or
        beyond ``cache.lengths`` (truncate first to overwrite). ``positions`` (B, k): rope
        positions, default ``slots``; they differ for tree candidates, whose slots are unique but
        whose positions are ``lengths + depth``. ``tree_mask`` (B, k, k) bool: which new tokens
        each new token sees (must include itself); default causal (lower triangular).

        A new token sees the history slots ``< cache.lengths`` plus the new slots its row of the
        new-token mask allows, nothing else (:func:`cached_attention_mask`). ``cache.lengths``
        is not changed here: the caller decides what becomes history (see ``SpeechLLaMA.step``).
        """
        positions = slots if positions is None else positions
        top_len, top_slot, top_pos = torch.stack(
            [cache.lengths.max(), slots.max() + 1, positions.max() + 1]
        ).tolist()
        if top_slot > cache.max_len or top_pos > self.cfg.max_seq_len:
            raise ValueError(
                f"writing slot {top_slot - 1} / position {top_pos - 1} exceeds the cache "
                f"(max_len={cache.max_len}) or max_seq_len={self.cfg.max_seq_len}"
            )
        mask = cached_attention_mask(cache.lengths, slots, tree_mask, max(top_len, top_slot))
        rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, rope, cache=cache, layer=i, slots=slots, mask=mask)
        return self.norm(x)
