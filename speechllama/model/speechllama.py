"""The assembled Speech-LLaMA: encoder -> adapter -> LLaMA decoder -> heads.

Sequence layout per utterance i:
    [audio embeddings a_0..a_{S_i-1}] [BOS] y_1 .. y_U [EOS]
with absolute positions 0..S_i+U+1; the KV cache slot of a token equals its position. Text is
packed right after each utterance's *own* audio length (not after the batch's longest), so a
sequence's positions, and hence its outputs, do not depend on what else is in the batch.

Decoding meets the model only at ``prefill`` and ``step``, which both count decoder calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from speechllama.model.adapter import Adapter
from speechllama.model.compiled import CompiledCalls
from speechllama.model.config import ModelConfig
from speechllama.model.decoder import LlamaDecoder
from speechllama.model.heads import build_heads
from speechllama.model.hf_llama import hf_decoder_config, load_hf_llama
from speechllama.model.kv_cache import KVCache
from speechllama.model.packed import PackedLinears, PackPolicy, packing_available
from speechllama.model.precision import (
    DECODE_PRECISIONS,
    bucket_frames,
    cast_matmul_weights,
    encoder_dtype,
)

# Decoder fields a pretrained LLM fixes; dropout and max_seq_len stay the run's choice.
_STRUCTURAL = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
               "rope_theta", "norm_eps", "tie_embeddings")  # fmt: skip


class SpeechLLaMA(nn.Module):
    """``encoder`` may be passed in (tests, or an encoder built elsewhere); by default it is
    built from ``config.encoder``. It must have ``output_dim`` and map
    ``features (B, T, n_mels), lens (B,) -> hidden (B, T', output_dim), lens' (B,)``."""

    def __init__(self, config: ModelConfig, encoder: nn.Module | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        if encoder is None:
            from speechllama.model.encoder import build_encoder

            encoder = build_encoder(config.encoder)
        d_enc = int(encoder.output_dim)
        self.encoder = encoder
        self.adapter = Adapter(config.adapter, d_enc, config.decoder.d_model)
        self.decoder = LlamaDecoder(config.decoder)
        self.adapter.match_scale(self.decoder.embed.weight)
        self.heads = build_heads(config, self.decoder.embed)
        self.ctc_head = build_ctc_head(config, d_enc)
        self.decoder_calls = 0  # incremented by prefill() and step(): strategies cannot forget
        self.pack_policy = PackPolicy()
        self._share_pack_policy()
        self.compiled: CompiledCalls | None = None  # see compile_calls
        self.encoder_dtype = torch.float32  # see set_encoder_precision

    # --- audio -> embeddings ----------------------------------------------------------------

    def encode(
        self, features: torch.Tensor, feature_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, n_mels), feature_lens (B,) -> audio embeddings (B, S, d_dec), lens (B,).

        Runs the encoder and the adapter (frame stacking + projection). Training code that
        needs the encoder output too (CTC) calls ``self.encoder`` and ``self.adapter`` itself.
        With a bf16 encoder (:meth:`set_encoder_precision`) the embeddings are still fp32, and
        S may exceed the longest length (the input is padded to a bucket); use the lens."""
        if self.encoder_dtype == torch.float32:
            hidden, lens = self.encoder(features, feature_lens)
        else:  # padded to a bucket of lengths: one kernel build per bucket, not per length
            features = bucket_frames(features, getattr(self.encoder, "max_input_frames", None))
            with torch.autocast(features.device.type, dtype=self.encoder_dtype):
                hidden, lens = self.encoder(features, feature_lens)
            hidden = hidden.float()
        return self.adapter(hidden, lens)

    def ctc_logits(self, frames: torch.Tensor) -> torch.Tensor:
        """frames -> CTC logits (B, T, V), blank = ``pad_id``. ``frames`` are what
        ``config.ctc_on`` names: encoder frames (B, T', d_enc) or audio embeddings (B, S, d_dec)."""
        if self.ctc_head is None:
            raise ValueError("this model has no CTC head (config.ctc is false)")
        if isinstance(self.ctc_head, TiedCTCScale):
            return self.ctc_head(frames, self.decoder.embed.weight)
        return self.ctc_head(frames)

    # --- teacher forcing ----------------------------------------------------------------------

    def forward(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        tokens: torch.Tensor,
        token_lens: torch.Tensor,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced training pass.

        audio (B, S, d_dec) audio embeddings, audio_lens (B,); tokens (B, U) = [BOS] y_1..y_{U-1}
        right-padded, token_lens (B,). Returns logits (B, U, K, V) for the text positions only:
        logits[:, u, k] predicts token u + k + 1 of [BOS] y EOS (head k, 0-based). With
        ``return_hidden`` also the decoder's final hidden states at those positions (B, U, d),
        which is what heads-only training caches (enough for every kind but ``layer``, whose
        heads attend over all positions). Padded text positions hold garbage."""
        B, _, d = audio.shape
        U = tokens.shape[1]
        audio_lens, token_lens = audio_lens.to(audio.device), token_lens.to(audio.device)
        total = int((audio_lens + token_lens).max())
        self._check_fits(total, self.config.decoder.max_seq_len, "max_seq_len")
        text_at = audio_lens[:, None] + torch.arange(U, device=audio.device)  # (B, U)
        x = torch.cat([_mask_audio(audio, audio_lens), audio.new_zeros(B, U, d)], dim=1)
        text = self.decoder.embed(tokens).to(x.dtype)
        x = x.scatter(1, text_at[..., None].expand(B, U, d), text)[:, :total]
        hidden = self.decoder.forward_train(x)
        # Padded text positions may lie past ``total``; clamp, their outputs are never used.
        at = text_at.clamp(max=total - 1)
        # The heads get every position: ``layer`` heads attend over the audio too.
        logits = self.heads(hidden, select=at)
        if not return_hidden:
            return logits
        return logits, hidden.gather(1, at[..., None].expand(B, U, hidden.shape[-1]))

    # --- incremental decoding -----------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache on the model's device. Its dtype is ``dtype``, else the autocast
        dtype when autocast is on (fp16 inference halves cache traffic), else the weights'."""
        device = self.decoder.embed.weight.device
        if dtype is None and torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        cache = self.decoder.new_cache(batch_size, max_len, dtype=dtype, device=device)
        extra = self.heads.cache_layers  # ``layer`` heads keep their keys/values as extra
        if extra:  # layers, so that truncate/reorder/copy_slots move them with the trunk's
            _, B, G, _, D = cache.k.shape
            cache = KVCache(cache.k.shape[0] + extra, B, G, max_len, D, cache.k.dtype, device)
        return cache

    @torch.no_grad()
    def prefill(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        cache: KVCache,
        num_heads: int | None = None,
    ) -> torch.Tensor:
        """Write [audio][BOS] of every sequence into ``cache`` (per-sequence lengths S_i + 1).

        audio (B, S, d_dec), audio_lens (B,). Sequence i's BOS sits at position S_i; the slots
        after it hold padding that the new lengths make invisible. Returns logits (B, 1, n, V)
        at each sequence's BOS position, n = ``num_heads`` or all K (decode with fewer heads than
        trained; keep n the same for every step of this cache). Counts one decoder call."""
        B, _, d = audio.shape
        _check_batch(B, cache)
        audio_lens = audio_lens.to(device=audio.device, dtype=torch.long)
        width = int(audio_lens.max()) + 1
        self._check_fits(width, cache.max_len, "the KV cache length")
        audio = audio.to(self.decoder.embed.weight.dtype)  # fp32 adapter -> a bf16 decoder
        x = torch.cat([_mask_audio(audio, audio_lens), audio.new_zeros(B, 1, d)], dim=1)[:, :width]
        bos = torch.full((B, 1), self.config.bos_id, dtype=torch.long, device=audio.device)
        bos_at = audio_lens[:, None, None].expand(B, 1, d)
        x = x.scatter(1, bos_at, self.decoder.embed(bos).to(x.dtype))
        cache.reset()
        self._measure_packing(B * width)
        slots = torch.arange(width, device=audio.device).expand(B, width)
        hidden = self.decoder.forward_cached(x, cache, slots)
        logits = self.heads(hidden, num_heads, select=audio_lens[:, None], cache=cache, slots=slots)
        cache.lengths = audio_lens + 1
        self.decoder_calls += 1
        return logits.float()  # strategies score in fp32 whatever the decoder's dtype

    @torch.no_grad()
    def step(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        tree_mask: torch.Tensor | None = None,
        num_heads: int | None = None,
    ) -> torch.Tensor:
        """One decoder call over k new tokens per sequence.

        tokens (B, k) are written at cache positions lengths[b] .. lengths[b] + k - 1 and the
        cache lengths advance by k; logits (B, k, n, V), n = ``num_heads`` or all K. Roll back
        with ``cache.truncate``.
        ``tree_mask`` (B, k, k) or (k, k) bool, row j = the new tokens token j sees (itself and
        its ancestors): token j then gets rope position lengths + depth_j, where depth_j =
        (row sum - 1), while its slot stays lengths + j; see ``KVCache.copy_slots`` to
        compact an accepted path. Counts one decoder call."""
        _check_batch(tokens.shape[0], cache)
        k = tokens.shape[1]
        positions = None
        if tree_mask is not None:
            tree_mask = tree_mask.to(device=tokens.device, dtype=torch.bool)
            positions = cache.lengths[:, None] + tree_mask.sum(-1) - 1
        if self.compiled is not None:
            self._check_fits(int(cache.lengths.max()) + k, cache.max_len, "the KV cache length")
            logits = self.compiled(self, tokens, cache, positions, tree_mask, num_heads)
        else:
            self._measure_packing(tokens.numel())
            slots = cache.lengths[:, None] + torch.arange(k, device=tokens.device)
            x = self.decoder.embed(tokens)
            hidden = self.decoder.forward_cached(x, cache, slots, positions, tree_mask)
            logits = self.heads(hidden, num_heads, None, cache, slots, positions, tree_mask)
        cache.lengths = cache.lengths + k
        self.decoder_calls += 1
        return logits.float()

    def compile_calls(self, mode: str | None = None) -> SpeechLLaMA:
        """Run every later ``step`` through ``torch.compile`` (:mod:`speechllama.model.compiled`):
        each new (tokens per call, heads) shape compiles once, seconds to a minute on a CPU
        (inductor's on-disk cache makes later processes faster), then calls cost less. For
        inference: the compiled graphs do not train. Not with int8 weights, whose matmuls are
        eager kernels of their own."""
        self.compiled = CompiledCalls.for_model(self, mode)
        return self

    def set_decoder_dtype(self, dtype: torch.dtype) -> SpeechLLaMA:
        """Store decoder and heads in ``dtype`` for inference (bf16 on a CPU with avx512_bf16:
        a decoder call reads half the bytes). Encoder and adapter stay as they are; audio
        embeddings are cast on entry and logits come out in fp32."""
        self.decoder.to(dtype)
        self.heads.to(dtype)
        return self

    def _packed(self) -> list[PackedLinears]:
        """The packed-weight stores of the decoder's and heads' decoder-call matmuls."""
        found = (
            getattr(m, "packed", None) for m in [*self.decoder.modules(), *self.heads.modules()]
        )
        return [p for p in found if isinstance(p, PackedLinears)]

    def _share_pack_policy(self) -> None:
        """Give every packed-weight store of the decoder and heads this model's one policy."""
        for packed in self._packed():
            packed.policy = self.pack_policy

    def tune_packing(self, rows: Iterable[int] = (1,)) -> None:
        """Measure now, for each call size in ``rows`` (B·k new tokens) not measured yet,
        whether packed weights are faster (``speechllama.model.pack_tuning``); otherwise the
        first call of each size measures it. Calls over ``MEASURED_ROWS`` rows (prefills) are
        not measured."""
        for n in rows:
            self._measure_packing(n)

    def _measure_packing(self, rows: int) -> None:
        policy, weight = self.pack_policy, self.decoder.embed.weight
        if (
            policy.measured(rows, weight.dtype)
            or self.heads.packed.int8  # int8 matmuls do not consult the policy
            or weight.device.type != "cpu"
            or not packing_available()
        ):
            return
        from speechllama.model.pack_tuning import measure_packing

        measure_packing(self, rows)

    def set_decoder_int8(self, enabled: bool = True) -> SpeechLLaMA:
        """Run the decoder's and heads' matmuls in decoder calls (prefill and step) on int8
        weights with per-row int8 activations, on CPU (``speechllama.model.int8``): a call reads
        a quarter of the fp32 bytes. An approximation of the fp32 model, like bf16; each row's
        matmuls still depend on that row alone, so batching does not change a transcript and
        verification reproduces int8 greedy almost always (see the module for the exception).
        Training and teacher-forced passes are unaffected."""
        if enabled and self.compiled is not None:
            raise ValueError("int8 weights cannot run compiled decoder calls; load without compile")
        for packed in self._packed():
            packed.int8 = enabled
        return self

    def set_encoder_precision(self, name: str) -> SpeechLLaMA:
        """``--encoder-dtype``: "float32", "bfloat16" or "auto" (bf16 on a CPU with AMX;
        :mod:`speechllama.model.precision` says why). bf16 casts the encoder's matmul weights
        in place and runs it under autocast: for inference (reload the model to train)."""
        dtype = encoder_dtype(name, self.decoder.embed.weight.device)
        cast_matmul_weights(self.encoder, dtype)
        self.encoder_dtype = dtype
        return self

    def set_decode_precision(self, name: str) -> SpeechLLaMA:
        """``--dtype`` of ``transcribe`` and ``bench``: "float32" (as trained), "bfloat16"
        (:meth:`set_decoder_dtype`) or "int8" (:meth:`set_decoder_int8`)."""
        if name not in DECODE_PRECISIONS:
            choices = ", ".join(DECODE_PRECISIONS)
            raise ValueError(f"unknown decode precision {name!r}; choose {choices}")
        self.set_decoder_int8(name == "int8")
        return self.set_decoder_dtype(torch.bfloat16 if name == "bfloat16" else torch.float32)

    # --- pretrained decoders, bookkeeping -----------------------------------------------------

    def load_pretrained_decoder(self, path: str | Path) -> None:
        """Copy a Hugging Face LLaMA's weights (``path``: config.json + safetensors) into the
        decoder, and its untied output matrix into the heads. The model must have been built
        with that LLM's structure: see :func:`with_pretrained_decoder`."""
        cfg, state = load_hf_llama(path)
        ours = self.config.decoder
        differ = [f for f in _STRUCTURAL if getattr(cfg, f) != getattr(ours, f)]
        if differ:
            raise ValueError(
                f"{path}: the LLM's {', '.join(differ)} differ from this model's decoder; build "
                "the model from with_pretrained_decoder(config, path)"
            )
        lm_head = state.pop("lm_head.weight", None)
        self.decoder.load_state_dict(state, strict=True)
        # Tied: head 1 is the embedding already, but heads derived from it restart from it too.
        self.heads.load_unembedding(self.decoder.embed.weight if lm_head is None else lm_head)

    def num_parameters(self) -> dict[str, dict[str, int]]:
        """``{part: {"trainable": n, "frozen": n}}`` for encoder, adapter, decoder, heads and
        (if present) ctc_head, and ``decoder_lora`` for LoRA factors (an unmerged LoRA model):
        those are trained while the decoder they adapt may be frozen. A weight shared by two
        parts (tied output layer) is counted once, under the first: the decoder."""
        from speechllama.model.lora import is_lora_name

        seen: set[int] = set()
        parts: dict[str, dict[str, int]] = {}
        for name in ("encoder", "adapter", "decoder", "heads", "ctc_head"):
            module = getattr(self, name)
            if module is None:
                continue
            for pname, p in module.named_parameters():
                part = "decoder_lora" if is_lora_name(pname) else name
                counts = parts.setdefault(part, {"trainable": 0, "frozen": 0})
                if id(p) not in seen:
                    seen.add(id(p))
                    counts["trainable" if p.requires_grad else "frozen"] += p.numel()
        return parts

    @staticmethod
    def _check_fits(needed: int, limit: int, what: str) -> None:
        if needed > limit:
            raise ValueError(
                f"audio embeddings + text need {needed} decoder positions, more than {what} "
                f"({limit}); use shorter audio or a larger adapter stack"
            )


def with_pretrained_decoder(config: ModelConfig, path: str | Path) -> ModelConfig:
    """``config`` with its decoder structure (and so vocabulary size) taken from the Hugging
    Face LLaMA at ``path``; ``dropout`` and ``max_seq_len`` stay ``config``'s own. The
    tokenizer must then be that LLM's (bos/eos/pad ids included): check before training."""
    hf = hf_decoder_config(path)
    ours = config.decoder
    decoder = dataclasses.replace(hf, dropout=ours.dropout, max_seq_len=ours.max_seq_len)
    new = config.replace(decoder=decoder)
    new.validate()
    return new


def build_ctc_head(config: ModelConfig, d_enc: int) -> nn.Module | None:
    """The auxiliary CTC head ``config`` asks for (None without ``ctc``): a linear layer on
    encoder frames (width ``d_enc``) or audio embeddings, or the tied scale of ``ctc_tied``.
    CTC blank is pad_id (0): the tokenizer reserves it, so it never is a transcript token."""
    if not config.ctc:
        return None
    if config.ctc_tied:
        return TiedCTCScale()
    d_ctc = config.decoder.d_model if config.ctc_on == "adapter" else d_enc
    return nn.Linear(d_ctc, config.decoder.vocab_size)


class TiedCTCScale(nn.Module):
    """CTC logits from the decoder's token embeddings (``config.ctc_tied``): frames (B, S, d)
    and embedding (V, d) -> (B, S, V) = exp(log_scale) * frames @ embedding^T.

    The embedding is passed in rather than held, so it stays one tensor of the decoder's (and
    frozen with it). The adapter already matches its outputs to the embeddings' RMS, so a
    frame equal to a token's embedding scores that token's squared norm (about 10 for
    SmolLM2) against about 0.4 for an unrelated token: peaked enough at scale 1, which the
    one parameter then tunes."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, frames: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        logits = frames @ embedding.t().to(frames.dtype)
        return logits * self.log_scale.exp().to(frames.dtype)


def _mask_audio(audio: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Zero audio frames (B, S, d) at or past each sequence's length."""
    valid = torch.arange(audio.shape[1], device=audio.device)[None, :] < lens[:, None]
    return audio * valid[..., None].to(audio.dtype)


def _check_batch(batch_size: int, cache: KVCache) -> None:
    if batch_size != cache.batch_size:
        raise ValueError(f"batch of {batch_size} sequences for a cache of {cache.batch_size}")
