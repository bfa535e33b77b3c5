"""Validation during training: teacher-forced dev loss, per-head top-1 accuracy, and greedy WER
on the dev manifest.

Greedy decoding comes from :mod:`speechllama.decoding` (the same strategy loop `transcribe`
uses), fed with audio embeddings computed by the training data path, so cached encoder outputs
are reused instead of re-encoding the dev audio at every evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils import parametrize

from speechllama.decoding import DecodingOptions, get_strategy
from speechllama.decoding.base import decode
from speechllama.evaluate import evaluate_results
from speechllama.text import Tokenizer
from speechllama.train.data import Batch
from speechllama.train.step import compute_loss, embed


def greedy_transcripts(model: torch.nn.Module, tokenizer: Tokenizer, batch: Batch) -> list[str]:
    """Greedy hypotheses (raw decoded text) for one batch, in batch order.

    Runs in full precision, as ``transcribe`` does, so the WER is the one users will see."""
    cfg = model.config
    with torch.inference_mode():
        emb, emb_lens, _, _ = embed(model, batch)
        decoded = decode(
            model,
            get_strategy(DecodingOptions(strategy="greedy")),
            emb,
            emb_lens,
            batch.durations,
            eos_id=cfg.eos_id,
            pad_id=cfg.pad_id,
            max_seq_len=cfg.decoder.max_seq_len,
        )
    return [tokenizer.decode(list(d.tokens)) for d in decoded]


def validate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    batches: Sequence[Batch],
    references: Sequence[str],
    *,
    ctc_weight: float,
    head_weights: tuple[float, ...],
    bf16: bool,
    max_utterances: int,
    decode_batches: Sequence[Batch] | None = None,
) -> dict[str, Any]:
    """Dev loss and per-head accuracy over all ``batches``, greedy WER over the first
    ``max_utterances``.

    ``references[i]`` is the raw transcript of dataset index i. ``decode_batches``: the batches
    to decode when ``batches`` cannot be (cached decoder hidden states of heads-only training
    feed the loss, not the decoder); default ``batches``. Returns ``dev_loss`` (the training
    objective), ``dev_ce``, ``dev_head_acc`` (K fractions: head k's top-1 accuracy on the
    positions its loss scores, EOS included), ``dev_wer`` (a fraction), ``dev_utterances`` and
    up to three ``examples`` of (reference, hypothesis)."""
    was_training = model.training
    model.eval()
    try:
        # LoRA deltas (parametrized weights) are computed once for the whole evaluation,
        # not on every weight read of every decoder call.
        with parametrize.cached():
            loss_sum = ce_sum = 0.0
            weight = 0
            correct: list[int] = []
            scored: list[int] = []
            for batch in batches:
                with torch.inference_mode():
                    out = compute_loss(
                        model,
                        batch,
                        ctc_weight=ctc_weight,
                        head_weights=head_weights,
                        bf16=bf16,
                        accuracy=True,
                    )
                loss_sum += float(out.total) * out.tokens
                ce_sum += out.ce * out.tokens
                weight += out.tokens
                if not correct:
                    correct, scored = [0] * len(out.correct), [0] * len(out.scored)
                correct = [a + b for a, b in zip(correct, out.correct, strict=True)]
                scored = [a + b for a, b in zip(scored, out.scored, strict=True)]
            refs: list[str] = []
            hyps: list[str] = []
            for batch in batches if decode_batches is None else decode_batches:
                if len(refs) >= max_utterances:
                    break
                hyps.extend(greedy_transcripts(model, tokenizer, batch))
                refs.extend(references[i] for i in batch.indices)
            refs, hyps = refs[:max_utterances], hyps[:max_utterances]
            scores = evaluate_results(refs, hyps)
    finally:
        model.train(was_training)
    return {
        "dev_loss": loss_sum / max(weight, 1),
        "dev_ce": ce_sum / max(weight, 1),
        "dev_head_acc": [c / max(n, 1) for c, n in zip(correct, scored, strict=True)],
        "dev_wer": scores["wer"],
        "dev_utterances": scores["utterances"],
        "examples": list(zip(refs[:3], hyps[:3], strict=True)),
    }
