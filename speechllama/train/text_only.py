"""Text-only batches: train the decoder's language model on sentences that have no audio.

Why: every training sentence with audio costs synthesis and an encoder pass, so the prepared
text holds about four times more sentences than the synthesized set has recordings
(``data/text/train.txt``: 108,519 against 27,381). Greedy errors on real speech are mostly
misspellings of words the model half-heard ("conserrors" for "concerned"): a weak internal LM,
which text alone can train. Each optimizer step adds one text-only batch to the speech batch
and the loss becomes speech loss + ``weight`` * text loss.

A text-only sequence is the usual layout with zero audio frames: [BOS] y -> y EOS (see
``train/losses.py``). Rotary positions are relative, so [BOS] at position 0 reads the same to
the decoder as [BOS] after the audio. Every head is trained on it, so the multi-token heads
learn from the extra text too. No CTC: there are no frames.

Batches are drawn with a generator seeded by (seed, step, micro-batch), so a resumed run sees
the same text batches it would have seen without stopping; no sampler state is saved.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from speechllama.data.textprep import read_corpus
from speechllama.text import BOS_ID, PAD_ID, Tokenizer, normalize, target_ids


@dataclass(frozen=True)
class TextBatch:
    """tokens (B, U) = [BOS] y; labels (B, U) = y EOS; label_lens (B,) = len(y) + 1; padded
    with the pad id (the loss ignores positions at or past ``label_lens``)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    label_lens: torch.Tensor

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(*(t.to(device, non_blocking=True) for t in (self.tokens, self.labels,
                                                                     self.label_lens)))  # fmt: skip


class TextCorpus:
    """Tokenised sentences of one or more corpus files, minus the sentences of ``exclude``.

    ``exclude`` (raw sentences, e.g. the dev manifest's) is matched after normalisation: a dev
    sentence learnt as text would make the dev WER that picks ``best`` a lie. Test sets are
    expected to be gone already (``speechllama data text`` removes them); this is the check
    that costs nothing."""

    def __init__(
        self,
        paths: Iterable[str | os.PathLike[str]],
        tokenizer: Tokenizer,
        *,
        exclude: Iterable[str] = (),
        max_tokens: int = 128,
    ) -> None:
        banned = {normalize(s) for s in exclude}
        seen: set[str] = set()
        self.targets: list[list[int]] = []
        self.excluded = self.too_long = 0
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: text corpus not found")
            for raw in read_corpus(path):
                text = normalize(raw)
                if not text or text in seen:
                    continue
                seen.add(text)
                if text in banned:
                    self.excluded += 1
                    continue
                ids = target_ids(text, tokenizer)
                if len(ids) > max_tokens:
                    self.too_long += 1
                    continue
                self.targets.append(ids)
        if not self.targets:
            names = ", ".join(str(p) for p in paths)
            raise ValueError(f"{names}: no usable sentences for text-only training")

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, size: int, seed: int, step: int, micro: int = 0, rank: int = 0) -> TextBatch:
        """``size`` sentences drawn without replacement, reproducibly for (seed, step, micro,
        rank): each rank of a data-parallel run draws its own."""
        rng = np.random.default_rng([seed, step, micro, rank])
        picks = rng.choice(len(self.targets), size=min(size, len(self.targets)), replace=False)
        targets = [torch.tensor(self.targets[i], dtype=torch.long) for i in picks]
        return TextBatch(
            tokens=pad_sequence(
                [torch.cat([torch.tensor([BOS_ID]), t[:-1]]) for t in targets],
                batch_first=True,
                padding_value=PAD_ID,
            ),
            labels=pad_sequence(targets, batch_first=True, padding_value=PAD_ID),
            label_lens=torch.tensor([len(t) for t in targets], dtype=torch.long),
        )


def text_logits(model: torch.nn.Module, batch: TextBatch) -> torch.Tensor:
    """Logits (B, U, K, V) of ``model`` (a SpeechLLaMA) on text with no audio before it."""
    d = model.decoder.embed.weight.shape[1]
    B = batch.tokens.shape[0]
    audio = batch.tokens.new_zeros(B, 0, d, dtype=model.decoder.embed.weight.dtype)
    no_frames = torch.zeros(B, dtype=torch.long, device=batch.tokens.device)
    return model(audio, no_frames, batch.tokens, batch.label_lens)
