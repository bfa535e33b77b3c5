"""Each multi-token head's top-1 accuracy with the reference fed to the decoder.

``head_accuracy[k - 1]`` is measured in a separate pass (after decoding, untimed) that feeds
each reference to the decoder after its audio, as training does, and counts how often head k's
argmax is the reference token k places after the position it reads, over the positions the
training loss scores (EOS included). It rates each head's proposals on their own, apart from
any decoding strategy and from the model's own errors upstream. References that cannot be
tokenised (characters outside the tokenizer, which become ``<unk>``) or that do not fit the
decoder with their audio are left out of it and listed in ``head_accuracy_skipped``.

Why it matters: a head's accuracy bounds what verification can accept from it (tokens per call),
whatever the decoding strategy, so heads can be compared before any decoding run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speechllama.inputs import Clip

if TYPE_CHECKING:
    from speechllama.data.manifest import Utterance
    from speechllama.transcribe import Transcriber


def reference_ids(text: str, tokenizer: Any) -> list[int]:
    """Reference transcript -> y EOS ids, as training builds its targets; ValueError when the
    text cannot be tokenised faithfully (a piece would be ``<unk>``)."""
    from speechllama.text import target_ids

    try:
        ids = target_ids(text, tokenizer)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"reference cannot be tokenised ({exc})") from None
    if tokenizer.unk_id in ids:
        raise ValueError("reference has characters outside the tokenizer's vocabulary (<unk>)")
    return ids


def teacher_forced_accuracy(
    transcriber: Transcriber,
    items: Sequence[tuple[Utterance, str | np.ndarray | Clip]],
    batch_size: int = 8,
    fp16: bool = False,
) -> dict[str, Any]:
    """Each head's top-1 accuracy with the references fed to the decoder (teacher forcing).

    ``items``: (utterance, what to load for it: a path or 16 kHz samples). Batched like
    decoding (duration-sorted, ``batch_size`` per batch; fp16 autocast on CUDA with ``fp16``).
    Returns ``head_accuracy`` (K fractions), ``head_accuracy_tokens`` (K positions scored),
    ``head_ce`` (K cross-entropies, nats per scored position: far more sensitive than WER while
    a model is weak, so weak models can still be ranked) and ``head_accuracy_skipped``
    ([{audio_filepath, reason}] for the utterances left out)."""
    from speechllama.audio import AudioError, load_audio
    from speechllama.features import compute_features
    from speechllama.train.losses import head_accuracy_counts, multi_token_loss

    model, cfg = transcriber.model, transcriber.config
    device = transcriber.device
    num_heads = model.heads.num_heads
    correct = torch.zeros(num_heads, dtype=torch.long)
    scored = torch.zeros(num_heads, dtype=torch.long)
    ce_sum = torch.zeros(num_heads, dtype=torch.float64)
    skipped: list[dict[str, str]] = []
    todo: list[tuple[Utterance, str | np.ndarray | Clip, list[int]]] = []
    for utt, source in items:
        try:
            todo.append((utt, source, reference_ids(utt.text, transcriber.tokenizer)))
        except ValueError as exc:
            skipped.append({"audio_filepath": str(utt.audio_filepath), "reason": str(exc)})
    todo.sort(key=lambda item: item[0].duration)
    autocast = (
        torch.autocast(device.type, dtype=torch.float16)
        if fp16 and device.type == "cuda"
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(todo), max(1, batch_size)):
            chunk, feats = [], []
            for utt, source, ids in todo[start : start + max(1, batch_size)]:
                try:
                    if isinstance(source, Clip):
                        wave = load_audio(source.path, max_seconds=None, offset=source.offset,
                                          duration=source.duration)  # fmt: skip
                    else:
                        wave = source if isinstance(source, np.ndarray) else load_audio(source)
                except AudioError as exc:
                    skipped.append({"audio_filepath": str(utt.audio_filepath), "reason": str(exc)})
                    continue
                feats.append(compute_features(wave, cfg.encoder.features, cfg.encoder.n_mels))
                chunk.append((utt, ids))
            if not chunk:
                continue
            with torch.inference_mode(), autocast:
                lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
                padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
                emb, emb_lens = model.encode(padded.to(device), lens.to(device))
                rows = []
                for row, ((utt, ids), n) in enumerate(zip(chunk, emb_lens.tolist(), strict=True)):
                    if n + len(ids) <= cfg.decoder.max_seq_len:
                        rows.append(row)
                        continue
                    reason = (
                        f"{utt.duration:.1f} s of audio and the reference need {n + len(ids)} "
                        f"decoder positions, more than {cfg.decoder.max_seq_len}"
                    )
                    skipped.append({"audio_filepath": str(utt.audio_filepath), "reason": reason})
                if not rows:
                    continue
                targets = [torch.tensor(chunk[r][1], dtype=torch.long) for r in rows]
                tokens, labels, label_lens = _teacher_batch(targets, cfg.bos_id, cfg.pad_id)
                pick = torch.tensor(rows, device=emb.device)
                logits = model(
                    emb.index_select(0, pick),
                    emb_lens.index_select(0, pick),
                    tokens.to(device),
                    label_lens.to(device),
                )
                labels, label_lens = labels.to(device), label_lens.to(device)
                hits, counts = head_accuracy_counts(logits, labels, label_lens)
                loss = multi_token_loss(logits, labels, label_lens)
            correct += hits.cpu()
            scored += counts.cpu()
            ce_sum += (loss.per_head.double() * loss.tokens.double()).cpu()
    finally:
        model.train(was_training)
    return {
        "head_accuracy": (correct.double() / scored.clamp(min=1)).tolist(),
        "head_accuracy_tokens": scored.tolist(),
        "head_ce": (ce_sum / scored.clamp(min=1).double()).tolist(),
        "head_accuracy_skipped": skipped,
    }


def _teacher_batch(
    targets: Sequence[torch.Tensor], bos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """targets [y EOS] -> tokens (B, U) = [BOS] y, labels (B, U) = y EOS, label_lens (B,),
    right-padded with ``pad_id``: the layout of ``SpeechLLaMA.forward`` and the training loss."""
    pad = torch.nn.utils.rnn.pad_sequence
    bos = torch.tensor([bos_id], dtype=torch.long)
    inputs = [torch.cat([bos, t[:-1]]) for t in targets]
    tokens = pad(inputs, batch_first=True, padding_value=pad_id)
    labels = pad(list(targets), batch_first=True, padding_value=pad_id)
    return tokens, labels, torch.tensor([len(t) for t in targets], dtype=torch.long)
