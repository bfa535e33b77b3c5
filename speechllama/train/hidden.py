"""Heads-only training made cheap: the frozen trunk's final hidden states, cached once.

Why: with encoder, adapter and decoder frozen (``--freeze encoder adapter decoder``) the trunk's
output for an utterance and its transcript never changes, yet the full path runs the whole
decoder every step for a loss that trains only the heads. A position-wise head kind
(``projection``, ``latent``, ``medusa``: head k's logits at text position u depend on the trunk
state h_u alone) needs nothing but h_u at the text positions, so those are computed once and
the heads then train on them without running the trunk at all.

Storage: the encoder cache's shard store (:class:`~speechllama.train.cache.EncoderCache`)
under ``ROOT/hidden-<fingerprint>``; one fp16 tensor (U_i, d) per (utterance, copy): the
decoder's final hidden states (after its final norm) at [BOS] y_1..y_n, exactly what
``SpeechLLaMA.forward(..., return_hidden=True)`` returns and the heads read. The targets
(y EOS) are not stored: the dataset tokenises the transcripts anyway. Keys add the transcript to
the encoder cache's audio key; the fingerprint hashes the encoder cache's own (encoder weights,
features, augmentation, seed), the adapter's and decoder's weights (token embedding included),
the tokenizer, and the build precision.

Built from the encoder cache's fp16 frames in fp32 without autocast, in eval mode (a frozen
trunk has no dropout). What the cached path gives up: SpecAugment (it would change the hidden
states every epoch; waveform variants still come from ``cache_copies``), the CTC loss (no
encoder frames in the batch), and the ``layer`` head kind, whose blocks attend over every
position, audio included: heads-only training of those runs the trunk every step
(``--no-hidden-cache``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from speechllama.text import TokenizerLike, tokenizer_id
from speechllama.train.cache import EncoderCache, duration_batches, entry_key, fingerprint
from speechllama.train.data import collate, row_token_ids
from speechllama.train.step import embed

HIDDEN_PREFIX = "hidden-"


class HiddenCache(EncoderCache):
    """Cached final hidden states (U_i, d) fp16 of (utterance, copy); see the module docstring."""

    what = "decoder hidden-state cache"

    def key(self, utt: Any, copy: int) -> str:
        """The audio's key plus the transcript (and the row's own ``token_ids``, which can
        tokenise the same text otherwise): other targets are another decoder input."""
        ids = row_token_ids(utt)
        text = utt.text if ids is None else f"{utt.text}\0{ids}"
        return hashlib.sha1(f"{entry_key(utt, copy)}\0{text}".encode()).hexdigest()


def check_position_wise(model: nn.Module) -> None:
    """Refuse head kinds that cannot train on cached text-position hidden states."""
    if model.heads.cache_layers:
        raise ValueError(
            f"heads-only training caches the decoder's final hidden states at the text "
            f"positions, but {model.config.heads.kind!r} heads attend over every position "
            "(audio included) and cannot train on them; pass --no-hidden-cache to run the "
            "frozen trunk every step instead"
        )


def hidden_fingerprint(model: nn.Module, encoder_fingerprint: str, tokenizer: TokenizerLike) -> str:
    """Hash of everything that changes the cached hidden states beyond the encoder cache."""
    cfg = model.config
    trunk = nn.ModuleDict({"adapter": model.adapter, "decoder": model.decoder})
    parts = {
        "encoder_cache": encoder_fingerprint,
        "adapter": cfg.adapter.__dict__,
        "decoder": cfg.decoder.__dict__,
        "bos_id": cfg.bos_id,
        "tokenizer": tokenizer_id(tokenizer),
        "precision": "float32",
    }
    return fingerprint(trunk, parts)


def build_hidden_cache(
    cache: HiddenCache,
    model: nn.Module,
    utterances: Sequence[Any],
    targets: Sequence[Sequence[int]],
    source: EncoderCache,
    *,
    copies: int,
    device: torch.device,
    batch_seconds: float = 160.0,
    shard_size: int = 512,
    progress: bool = True,
) -> int:
    """Run the frozen trunk once over every (utterance, copy) not yet in ``cache``; returns how
    many were added.

    ``targets[i]`` = y EOS of ``utterances[i]``; ``source`` holds the encoder outputs of the
    same copies. Length-sorted and batched by ``batch_seconds`` of audio, like the encoder
    cache. The model's train/eval modes are restored afterwards."""
    todo = sorted(cache.missing(utterances, copies), key=lambda ic: utterances[ic[0]].duration)
    pending: dict[str, torch.Tensor] = {}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    bar = tqdm(
        total=len(todo), desc="caching decoder hidden states", unit="utt", disable=not progress
    )
    try:
        for start, stop in duration_batches(
            [utterances[i].duration for i, _ in todo], batch_seconds
        ):
            work = todo[start:stop]
            examples = [
                {
                    "inputs": source.get(utterances[i], copy),
                    "target": targets[i],
                    "duration": utterances[i].duration,
                    "index": i,
                }
                for i, copy in work
            ]
            batch = collate(examples, encoded=True).to(device)
            with torch.inference_mode():
                emb, emb_lens, _, _ = embed(model, batch)
                _, hidden = model(emb, emb_lens, batch.tokens, batch.label_lens, return_hidden=True)
            for (i, copy), h, n in zip(work, hidden, batch.label_lens.tolist(), strict=True):
                pending[cache.key(utterances[i], copy)] = (
                    h[:n].to(torch.float16).cpu().contiguous().clone()
                )
            if len(pending) >= shard_size:
                cache.add(pending)
                pending = {}
            bar.update(len(work))
        if pending:
            cache.add(pending)
    finally:
        bar.close()
        for module, training in modes.items():
            module.training = training
    return len(todo)
