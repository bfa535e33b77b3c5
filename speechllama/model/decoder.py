"""LLaMA-style decoder over a static, position-indexed KV cache (``model.kv_cache``).

Rotary embeddings, RMSNorm, grouped-query attention and the SwiGLU MLP, run either over whole
sequences (training) or as cached calls of k new tokens whose visibility is the cache's one
rule (:func:`cached_attention_mask`).

Shapes: B batch, T / k new tokens, H query heads, G key/value heads, D head dim, W attended
cache width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from speechllama.model.config import DecoderConfig
from speechllama.model.kv_cache import KVCache, as_dtype, cached_attention_mask
from speechllama.model.packed import PackedLinears


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the activation dtype (as LLaMA does), so that bf16
    training and fp16 inference keep the normalisation exact."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op instead of seven (11 us less per norm at one row, 2 threads), and
            # bitwise the same as the general path below in fp32.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


_ROPE: dict[tuple[int, float, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _rope_cache(
    length: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos, signed sin (>= length, D) for positions 0.., built once per (D, theta,
    device) and grown by doubling: the same float32 operations per position as computing them
    per call (so bitwise the same values), without a dozen small ops in every decoder call.
    The sin table's first half is negated (see :func:`_apply_rope`)."""
    key = (head_dim, theta, device)
    hit = _ROPE.get(key)
    if hit is None or hit[0].shape[0] < length:
        size = max(length, 2 * hit[0].shape[0] if hit is not None else 256)
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim)
        )
        freqs = torch.arange(size, device=device).float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        sign = torch.ones(head_dim, device=device)
        sign[: head_dim // 2] = -1.0
        hit = _ROPE[key] = (emb.cos(), emb.sin() * sign)
    return hit


def rope_tables(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin (B, T, D) for rope positions (B, T), in the "halves" layout of HF
    LLaMA (the sin's first half negated, as :func:`_apply_rope` takes it).

    Looked up in float32 tables kept outside the module (not buffers), so that
    ``model.to(bfloat16)`` cannot silently lower the frequencies' precision. ``length``: more
    than the largest position, when the caller already read it back (saves a host sync)."""
    if length is None:
        length = int(positions.max()) + 1 if positions.numel() else 0
    cos, sin = _rope_cache(length, head_dim, theta, positions.device)
    return as_dtype(cos[positions], dtype), as_dtype(sin[positions], dtype)


def cached_rope(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_tables` shaped (B, T, 1, D) for a cached call's (B, T, heads, D) layout,
    built once per call rather than once per layer."""
    cos, sin = rope_tables(positions, head_dim, theta, dtype, length)
    return cos[:, :, None], sin[:, :, None]


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., D); cos, signed sin broadcastable to x (the caller places the heads axis).

    HF LLaMA's ``x·cos + cat(-x2, x1)·sin`` as ``x·cos + cat(x2, x1)·sin'`` with sin' = sin
    whose first half is negated: the same products bit for bit (a sign flip is exact), in one
    ``roll`` instead of chunk, neg and cat."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


@dataclass(frozen=True)
class CallMask:
    """The attention mask of one cached call, prepared once for all layers.

    ``width`` W: the attended cache prefix. ``bias`` (B, 1, r·T, W) additive float (0 visible,
    -inf hidden) with each token's row repeated for the r = H / G query heads that share a
    key/value head (grouped-query layout, see :meth:`Attention._cached`), or None when every
    token sees all W slots (one new token, no ragged batch), which SDPA then skips.
    ``write_index``: the call's cache scatter index (``KVCache.write_index``), also built once
    for all layers when set."""

    width: int
    bias: torch.Tensor | None
    write_index: torch.Tensor | None = None


def call_mask(
    visible: torch.Tensor, group: int, dtype: torch.dtype, write_index: torch.Tensor | None = None
) -> CallMask:
    """visible (B, T, W) bool (from :func:`cached_attention_mask`) -> :class:`CallMask` for
    query heads in groups of ``group`` per key/value head."""
    W = visible.shape[-1]
    if bool(visible.all()):
        return CallMask(W, None, write_index)
    return CallMask(W, mask_bias(visible, group, dtype), write_index)


def mask_bias(visible: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """visible (B, T, W) bool -> additive bias (B, 1, group·T, W): 0 visible, -inf hidden, each
    token's row repeated for the ``group`` query heads of a key/value head. Built even when
    every slot is visible (the compiled call has no host-side branch to skip it)."""
    B, T, W = visible.shape
    bias = torch.zeros(B, 1, 1, T, W, dtype=dtype, device=visible.device)
    bias.masked_fill_(~visible[:, None, None], float("-inf"))
    return bias.expand(B, 1, group, T, W).reshape(B, 1, group * T, W)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.packed = PackedLinears()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        layer: int = 0,
        slots: torch.Tensor | None = None,
        mask: CallMask | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, d). Without a cache: causal self-attention over x. With one: write this
        call's keys/values at ``slots`` (B, T), then attend over the first ``mask.width``
        cache slots under ``mask`` (a :class:`CallMask`, or visible (B, T, W) bool)."""
        if cache is not None:
            assert slots is not None and mask is not None
            return self._cached(x, rope, cache, layer, slots, mask)
        B, T, _ = x.shape
        q = self.wq(x).reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope[0][:, None], rope[1][:, None]
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        repeat = self.n_heads // self.n_kv_heads
        if repeat > 1:  # grouped-query attention: kv head g serves query heads g*r .. g*r+r-1
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def _cached(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        layer: int,
        slots: torch.Tensor,
        mask: CallMask | torch.Tensor,
    ) -> torch.Tensor:
        """One matmul for q|k|v; grouped-query attention without copying keys/values: query
        head g·r + i (r = H / G) attends with key/value head g, so q (B, H, T, D) is laid out
        as (B, G, r·T, D) and SDPA sees G heads of r·T query rows each."""
        B, T, _ = x.shape
        H, G, D = self.n_heads, self.n_kv_heads, self.head_dim
        r = H // G
        if not isinstance(mask, CallMask):
            mask = call_mask(mask, r, x.dtype)
        weights = (self.wq.weight, self.wk.weight, self.wv.weight)
        qkv = self.packed.linear(x, "qkv", weights).reshape(B, T, H + 2 * G, D)
        qk = _apply_rope(qkv[:, :, : H + G], *rope)  # rope tables (B, T, 1, D)
        k_new, v_new = qk[:, :, H:].transpose(1, 2), qkv[:, :, H + G :].transpose(1, 2)
        cache.write(layer, slots, k_new, v_new, mask.write_index)
        k, v = cache.read(layer, mask.width)
        q = qk[:, :, :H].transpose(1, 2).reshape(B, G, r * T, D)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, as_dtype(k, q.dtype), as_dtype(v, q.dtype), attn_mask=mask.bias, dropout_p=p
        )
        out = out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
        return self.packed.linear(out, "o", (self.wo.weight,))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.packed = PackedLinears()

    def forward(self, x: torch.Tensor, cached: bool = False) -> torch.Tensor:
        """``cached``: a decoder call, whose gate|up is one matmul on packed weights."""
        if not cached:
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        gate, up = self.packed.linear(x, "gate_up", (self.w_gate.weight, self.w_up.weight)).chunk(
            2, dim=-1
        )
        return self.packed.linear(F.silu(gate) * up, "down", (self.w_down.weight,))


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
        """``rope``: cos, signed sin (B, T, D); (B, T, 1, D) with a cache (:func:`cached_rope`)."""
        if not self.training:  # dropout is the identity: skip its dispatch (decoder calls)
            x = x + self.attn(self.attn_norm(x), rope, **cached)
            return x + self.mlp(self.mlp_norm(x), cached=bool(cached))
        x = x + self.drop(self.attn(self.attn_norm(x), rope, **cached))
        return x + self.drop(self.mlp(self.mlp_norm(x), cached=bool(cached)))


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
        if cfg.lora_rank > 0:
            from speechllama.model.lora import add_lora

            add_lora(self, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets))

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
        c = self.cfg
        B, k = slots.shape
        index = cache.write_index(slots)
        if tree_mask is None and B == k == 1 and top_slot == top_len + 1:
            mask = CallMask(top_slot, None, index)  # one token right after its history: sees all
        else:
            visible = cached_attention_mask(cache.lengths, slots, tree_mask, max(top_len, top_slot))
            mask = call_mask(visible, c.n_heads // c.n_kv_heads, x.dtype, index)
        rope = cached_rope(positions, c.head_dim, c.rope_theta, x.dtype, top_pos)
        return self.run_blocks(x, rope, cache, slots, mask)

    def run_blocks(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        slots: torch.Tensor,
        mask: CallMask,
    ) -> torch.Tensor:
        """The layers and final norm of a cached call, x (B, k, d) -> hidden (B, k, d), once
        its rotary tables (:func:`cached_rope`) and mask are built: shared by
        :meth:`forward_cached` and the compiled call (``speechllama.model.compiled``)."""
        for i, block in enumerate(self.layers):
            x = block(x, rope, cache=cache, layer=i, slots=slots, mask=mask)
        return self.norm(x)
