"""``layer`` heads (Gloeckle et al. 2024): one transformer block per extra head on the trunk.

Head 1 is the trunk's own output (the decoder's last layer, final norm) through the shared
un-embedding ``proj``. Head k = 2..K runs one more decoder :class:`~.decoder.Block` on the
trunk's hidden states and un-embeds its output with the same ``proj``.

These blocks attend over past positions, so they are not position-wise: they keep their own
keys and values as ``K - 1`` extra layers of the model's KV cache (layer ``n_layers + k - 2``
holds head k's). Because they live in the same :class:`~.kv_cache.KVCache`, rollback
(``truncate``), beam ``reorder`` and tree ``copy_slots`` move them with the trunk's, and a
cached call computes exactly the function the teacher-forced pass computes. Consequences:

- the heads need the trunk's hidden state at *every* position (audio included), so training
  cannot run them on cached text-position hidden states alone;
- decoding with ``num_heads = n < K`` fills only heads 2..n's cache layers: use the same n for
  the prefill and every step of one cache.

Initialisation: each block's residual outputs (``attn.wo``, ``mlp.w_down``) start at zero, so a
block starts as the identity and every head starts as head 1 (see :mod:`.heads`); the other
weights get the decoder's N(0, 0.02) so the gradients of the zeroed ones are not zero.
"""

from __future__ import annotations

import torch
from torch import nn

from speechllama.model.config import ModelConfig
from speechllama.model.decoder import Block, cached_rope, call_mask, rope_tables
from speechllama.model.heads import OutputHeads, gather_positions, register, tie_target
from speechllama.model.kv_cache import KVCache, cached_attention_mask


class LayerHeads(OutputHeads):
    """``blocks[k - 2]`` is head k's transformer block (decoder width, heads and d_ff)."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        d = cfg.decoder
        super().__init__(d.d_model, d.vocab_size, cfg.heads.num_heads, tie_target(cfg, embedding))
        self.blocks = nn.ModuleList(Block(d) for _ in range(self.num_heads - 1))
        for block in self.blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(block.attn.wo.weight)
            nn.init.zeros_(block.mlp.w_down.weight)
        self.cache_layers = self.num_heads - 1
        self.first_layer = d.n_layers  # cache layer of head 2's block
        self.head_dim, self.rope_theta = d.head_dim, d.rope_theta
        self.group = d.n_heads // d.n_kv_heads

    def forward(
        self,
        hidden: torch.Tensor,
        num_heads: int | None = None,
        select: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden (B, T, d) -> logits (B, T, n, V), or (B, U, n, V) at ``select`` (B, U).

        Without a cache, ``hidden`` is a whole sequence at positions 0..T-1 (causal, as in
        ``LlamaDecoder.forward_train``). With one, the arguments are those of the decoder's
        ``forward_cached`` for the same call, made *before* ``cache.lengths`` advances."""
        n = self.active(num_heads)
        # Head 1 un-embedded on its own: the same matmul whatever n, so bitwise n = 1's logits.
        several = hidden.shape[0] * hidden.shape[1] > 1 or hidden.dtype != torch.float32
        decode = cache is not None and several  # see OutputHeads.forward
        unembed = self.proj.weight
        at_select = hidden if select is None else gather_positions(hidden, select)
        first = self.linear(at_select, "proj", unembed, decode)
        if n == 1:
            return first.unsqueeze(2)
        B, T, _ = hidden.shape
        if cache is None:
            at = torch.arange(T, device=hidden.device).expand(B, T)
            rope = rope_tables(at, self.head_dim, self.rope_theta, hidden.dtype)
            outputs = [block(hidden, rope) for block in self.blocks[: n - 1]]
        else:
            if slots is None:
                raise ValueError("layer heads with a KV cache need the call's slots")
            if cache.k.shape[0] < self.first_layer + n - 1:
                raise ValueError(
                    f"the KV cache has {cache.k.shape[0]} layers, the decoder and its layer "
                    f"heads need {self.first_layer + n - 1}: build it with model.new_cache"
                )
            at = slots if positions is None else positions
            rope = cached_rope(at, self.head_dim, self.rope_theta, hidden.dtype)
            visible = cached_attention_mask(cache.lengths, slots, tree_mask)
            index = cache.write_index(slots)
            mask = call_mask(visible, self.group, hidden.dtype, index)  # once for all the blocks
            outputs = [
                block(hidden, rope, cache=cache, layer=self.first_layer + j, slots=slots,
                      mask=mask)
                for j, block in enumerate(self.blocks[: n - 1])
            ]  # fmt: skip
        latents = torch.stack(outputs, dim=2)  # (B, T, n - 1, d)
        if select is not None:
            latents = gather_positions(latents, select)
        return torch.cat([first.unsqueeze(2), self.linear(latents, "proj", unembed, decode)], dim=2)


@register("layer")
def _layer(cfg: ModelConfig, embedding: nn.Embedding) -> OutputHeads:
    return LayerHeads(cfg, embedding)
