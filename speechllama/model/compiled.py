"""Decoder calls through ``torch.compile``: the gpt-fast recipe on our static KV cache.

Why: at batch 1 a decoder call of ``small`` reads 38 MB of weights in about 1 ms of matmuls
and then spends as long again dispatching some 250 small ATen ops (norms, rotary, cache
writes, masks, the heads) one by one, each touching memory that the weight stream has just
pushed out of the CPU's caches. Inductor fuses those ops into a few generated kernels. What
it needs is a call whose shapes and control flow do not depend on values read back from the
tensors, which the eager call (:meth:`LlamaDecoder.forward_cached`) deliberately does: it reads
the lengths back to attend over only the used prefix of the cache and to skip the mask of a
one-token call. The compiled call instead attends over the whole cache (``cache.max_len``
slots) under a mask built on the device, so its graph depends only on shapes:

- cache length, batch size and new tokens per call are traced as symbols from the start
  (:func:`_mark_dynamic`), so a new utterance, a finished row or a longer accepted block does
  not recompile; 1 stays a constant, so batch 1 and one-token calls get graphs of their own,
  as does each head count;
- the prefill stays eager: its length changes with every utterance and it runs once;
- PackedLinears falls back to plain ``F.linear`` while tracing (``torch.compiler.is_compiling``);
  the oneDNN packed path is an eager-only optimisation;
- ``layer`` heads read their attention width back (``Tensor.item``): dynamo splits the graph
  there (one warning) and the call stays correct, with less fused.

The result is the same arithmetic as the eager call except for the attention over extra
masked slots and inductor's own kernels, so logits agree to fp32 rounding (about 1e-6), not
bit for bit: greedy with and without compilation may differ where two tokens tie. Lossless
strategies stay lossless because greedy and verification both run compiled calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from speechllama.model.decoder import CallMask, cached_rope, mask_bias, rope_tables
from speechllama.model.kv_cache import KVCache, cached_attention_mask

if TYPE_CHECKING:
    from speechllama.model.speechllama import SpeechLLaMA

__all__ = ["CompiledCalls", "compile_available", "compile_options"]

# Graphs a model may hold: (k, heads) pairs of the strategies in one process, times a few
# dynamic-shape variants. Dynamo's default of 8 is reached by a bench that runs every method.
CACHE_SIZE_LIMIT = 64


def compile_available() -> str | None:
    """None when ``torch.compile`` can build CPU kernels here, else why not (one line).
    Inductor's CPU backend compiles C++ at run time, so it needs a C++ compiler."""
    import shutil

    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "torch.compile needs a C++ compiler (g++) on the PATH for CPU kernels"
    return None


def compile_options(device: torch.device) -> dict[str, Any] | None:
    """``torch.compile`` options for decoder calls on ``device``. On CPU, inductor's C++
    wrapper: it calls the kernels from C++ instead of generated Python, which took 1.29x less
    decoder time for ``small``'s batch-1 greedy on real-smoke (docs/speed.md), for a longer
    compile. Elsewhere inductor's defaults."""
    return {"cpp_wrapper": True} if device.type == "cpu" else None


def static_call(
    model: SpeechLLaMA,
    tokens: torch.Tensor,
    cache: KVCache,
    positions: torch.Tensor | None,
    tree_mask: torch.Tensor | None,
    num_heads: int | None,
) -> torch.Tensor:
    """One decoder call of tokens (B, k) against ``cache`` -> logits (B, k, n, V), the
    arithmetic of ``SpeechLLaMA.step`` without a value-dependent branch: every call attends
    over all ``cache.max_len`` slots, hidden ones masked. Does not advance ``cache.lengths``
    (the caller does, outside the graph)."""
    decoder, c = model.decoder, model.decoder.cfg
    slots = cache.lengths[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
    positions = slots if positions is None else positions
    x = decoder.embed(tokens)
    width = cache.max_len
    visible = cached_attention_mask(cache.lengths, slots, tree_mask, width)  # (B, k, W)
    bias = mask_bias(visible, c.n_heads // c.n_kv_heads, x.dtype)
    mask = CallMask(width, bias, cache.write_index(slots))
    rope = cached_rope(positions, c.head_dim, c.rope_theta, x.dtype, c.max_seq_len)
    hidden = decoder.run_blocks(x, rope, cache, slots, mask)
    return model.heads(hidden, num_heads, None, cache, slots, positions, tree_mask)


class CompiledCalls:
    """``static_call`` compiled once per model; ``SpeechLLaMA.step`` routes through it when
    the model was given one (:meth:`SpeechLLaMA.compile_calls`). ``mode`` and ``options``
    are ``torch.compile``'s."""

    def __init__(self, mode: str | None = None, options: dict[str, Any] | None = None) -> None:
        import torch._dynamo

        why = compile_available()
        if why is not None:
            raise RuntimeError(why)
        config = torch._dynamo.config
        config.cache_size_limit = max(config.cache_size_limit, CACHE_SIZE_LIMIT)
        self.mode, self.options = mode, options
        self._fn = torch.compile(static_call, dynamic=None, mode=mode, options=options)
        self._rope_ready: set[torch.device] = set()

    @classmethod
    def for_model(cls, model: SpeechLLaMA, mode: str | None = None) -> CompiledCalls:
        """Compiled calls for ``model`` with :func:`compile_options` for its device. Refuses
        int8 weights: their matmuls are eager kernels of their own, and tracing would quietly
        run the fp32 weights instead."""
        if model.heads.packed.int8:
            raise ValueError("compiled decoder calls need float32 or bfloat16 weights, not int8")
        return cls(mode, compile_options(model.decoder.embed.weight.device))

    def __deepcopy__(self, memo: dict) -> CompiledCalls:
        # Graphs belong to the model they traced: a copied model compiles its own.
        return CompiledCalls(self.mode, self.options)

    def __call__(
        self,
        model: SpeechLLaMA,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None,
        tree_mask: torch.Tensor | None,
        num_heads: int | None,
    ) -> torch.Tensor:
        import torch._dynamo

        if tokens.device not in self._rope_ready:
            # Grow the shared rotary tables to their final size before the first trace: a
            # graph guards on their size, and growing them later would recompile it.
            c = model.decoder.cfg
            at = torch.zeros(1, 1, dtype=torch.long, device=tokens.device)
            rope_tables(at, c.head_dim, c.rope_theta, torch.float32, c.max_seq_len)
            self._rope_ready.add(tokens.device)
        # Canonical strides (a (1, k) slice of a wider block is "contiguous" with stride K) and
        # the resolved head count: either would otherwise fail a guard and recompile.
        tokens = tokens.new_empty(tokens.shape).copy_(tokens)
        num_heads = model.heads.active(num_heads)
        _mark_dynamic(tokens, cache, positions, tree_mask)
        return self._fn(model, tokens, cache, positions, tree_mask, num_heads)

    def warm_up(self, model: SpeechLLaMA, num_heads: int | None, max_batch: int = 1) -> None:
        """Compile now, on a scratch cache, every graph a strategy decoding with ``num_heads``
        heads can meet in batches of up to ``max_batch``: batch 1 and, above it, one graph
        for every larger batch; one-token calls and many-token calls (one graph serves every
        k >= 2). Without it the first call of each shape compiles mid-decoding, seconds that
        land in a timed pass or a request."""
        c = model.decoder.cfg
        device = model.decoder.embed.weight.device
        with torch.inference_mode():
            for batch in (1,) if max_batch == 1 else (1, max_batch):
                for k in (1, 2):
                    cache = model.new_cache(batch, 16)  # layer heads add their own layers
                    cache.lengths = torch.full((batch,), 4, dtype=torch.long, device=device)
                    tokens = torch.full((batch, k), c.vocab_size - 1, device=device)
                    self(model, tokens, cache, None, None, num_heads)


def _mark_dynamic(
    tokens: torch.Tensor,
    cache: KVCache,
    positions: torch.Tensor | None,
    tree_mask: torch.Tensor | None,
) -> None:
    """Trace sizes that change between calls as symbols from the first trace on, so that no
    later call recompiles (a recompile costs seconds in the middle of decoding): the cache
    length always; batch size B and new tokens k when above 1 (dynamo keeps 1 a constant, so
    B = 1 and k = 1 get graphs of their own). Threshold acceptance feeds 1..K tokens per call,
    batched decoding drops finished rows: without this each would recompile once more."""
    import torch._dynamo

    mark = torch._dynamo.maybe_mark_dynamic
    B, k = tokens.shape
    for kv in (cache.k, cache.v):
        mark(kv, 3)
        if B > 1:
            mark(kv, 1)
    if B > 1:
        mark(tokens, 0)
        mark(cache.lengths, 0)
    if k > 1:
        mark(tokens, 1)
    for extra in (positions, tree_mask):
        if extra is not None:
            for dim, size in enumerate(extra.shape):
                if size > 1:
                    mark(extra, dim)
