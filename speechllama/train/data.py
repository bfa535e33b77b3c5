"""Training examples and batches: audio -> (features | cached encoder output) + target tokens.

Targets follow the model's layout (see ``train/losses.py``): ``tokens`` = [BOS] y (decoder
input), ``labels`` = y EOS (next-token targets), both right-padded with the pad id, plus the
bare ``y`` for CTC. Texts are normalised and tokenised once at start-up, not every epoch. A row
that carries ``token_ids`` (a self-distillation manifest, ``speechllama data relabel``) is
trained on those ids when they spell its text with this tokenizer: a model's greedy output is
not always the canonical tokenisation of its own text, and the heads must predict the ids
verification compares.

Randomness (waveform augmentation, the choice of cached copy) is drawn from a generator seeded
by ``(seed, epoch, index)``, so an example is the same whichever worker builds it and whether
or not the run was resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from speechllama.audio import audio_duration, load_audio
from speechllama.features import compute_features
from speechllama.text import BOS_ID, EOS_ID, PAD_ID, Tokenizer, normalize, target_ids

SAMPLE_RATE = 16_000
_SEGMENT_SLACK = 0.1  # seconds a file may exceed its row's duration and still be taken whole
_TENSOR_FIELDS = (
    "inputs",
    "input_lens",
    "tokens",
    "labels",
    "label_lens",
    "ctc_targets",
    "ctc_lens",
)
WaveAugment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass
class Batch:
    """One padded micro-batch.

    inputs (B, T, F): log-mel features, or encoder outputs when ``encoded``, or when ``hidden``
    the frozen decoder's final hidden states at the text positions (B, U, d) (heads-only
    training, see ``train/hidden.py``); input_lens (B,);
    tokens (B, U) = [BOS] y; labels (B, U) = y EOS; label_lens (B,) = len(y) + 1;
    ctc_targets (B, L) = y; ctc_lens (B,); durations in seconds; indices into the dataset."""

    inputs: torch.Tensor
    input_lens: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor
    label_lens: torch.Tensor
    ctc_targets: torch.Tensor
    ctc_lens: torch.Tensor
    durations: list[float]
    indices: list[int]
    encoded: bool = False
    hidden: bool = False

    def to(self, device: torch.device | str) -> Batch:
        move = {name: getattr(self, name).to(device, non_blocking=True) for name in _TENSOR_FIELDS}
        return Batch(
            **move,
            durations=self.durations,
            indices=self.indices,
            encoded=self.encoded,
            hidden=self.hidden,
        )

    @property
    def audio_seconds(self) -> float:
        return float(sum(self.durations))


def load_wave(utt: Any) -> np.ndarray:
    """The utterance's samples (N,) float32 at 16 kHz: the whole file, or the segment
    [offset, offset + duration) when the row describes part of a longer recording."""
    offset = float(getattr(utt, "offset", 0.0) or 0.0)
    if offset > 0 or audio_duration(utt.audio_filepath) > utt.duration + _SEGMENT_SLACK:
        return load_audio(
            utt.audio_filepath, sample_rate=SAMPLE_RATE, offset=offset, duration=utt.duration
        )
    return load_audio(utt.audio_filepath, sample_rate=SAMPLE_RATE)


def row_token_ids(utt: Any) -> list[int] | None:
    """The row's own ``token_ids`` (a list of non-special, non-negative ints), or None."""
    ids = getattr(utt, "extra", {}).get("token_ids")
    if not isinstance(ids, list) or not ids:
        return None
    special = (PAD_ID, BOS_ID, EOS_ID)
    ok = all(type(i) is int and i >= 0 and i not in special for i in ids)  # bool is no id
    return ids if ok else None


def utterance_targets(utt: Any, tokenizer: Tokenizer) -> list[int]:
    """y EOS of one row: its ``token_ids`` when they decode, with ``tokenizer``, to its text
    (after normalisation; ids of another tokenizer fail that test), else its text tokenised."""
    ids = row_token_ids(utt)
    if ids is not None:
        try:
            spelled = tokenizer.decode(ids)
        except ValueError:  # an id outside this vocabulary
            spelled = None
        if spelled is not None and normalize(spelled) == normalize(utt.text):
            return [*ids, EOS_ID]
    return target_ids(utt.text, tokenizer)


class SpeechDataset(torch.utils.data.Dataset):
    """Utterances (objects with ``audio_filepath``, ``text``, ``duration``) -> examples.

    With ``cache`` (an :class:`~speechllama.train.cache.EncoderCache`) the example is the cached
    encoder output of one of its copies; otherwise the features of the (optionally augmented)
    waveform. ``targets[i]`` is y EOS of utterance i."""

    def __init__(
        self,
        utterances: Sequence[Any],
        tokenizer: Tokenizer,
        *,
        feature_kind: str = "fbank",
        n_mels: int = 80,
        augment: WaveAugment | None = None,
        cache: Any = None,
        seed: int = 0,
    ) -> None:
        self.utterances = list(utterances)
        self.targets = [utterance_targets(u, tokenizer) for u in self.utterances]
        self.durations = [float(u.duration) for u in self.utterances]
        self.feature_kind = feature_kind
        self.n_mels = n_mels
        self.augment = augment
        self.cache = cache
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.utterances)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        utt = self.utterances[index]
        if self.cache is not None:
            copy = int(self.rng(index).integers(self.cache.copies))
            inputs = self.cache.get(utt, copy)
        else:
            wave = load_wave(utt)
            if self.augment is not None:
                wave = self.augment(wave, self.rng(index))
            inputs = compute_features(wave, self.feature_kind, self.n_mels)
        return {
            "inputs": inputs,
            "target": self.targets[index],
            "duration": self.durations[index],
            "index": index,
        }


def collate(
    examples: Sequence[dict[str, Any]], encoded: bool = False, hidden: bool = False
) -> Batch:
    """Pad a list of examples into a :class:`Batch` (inputs with zeros, ids with the pad id);
    ``encoded``/``hidden`` say what the inputs are (see :class:`Batch`)."""
    inputs = [e["inputs"] for e in examples]
    targets = [torch.tensor(e["target"], dtype=torch.long) for e in examples]
    y = [t[:-1] for t in targets]  # drop EOS
    return Batch(
        inputs=pad_sequence(inputs, batch_first=True),
        input_lens=torch.tensor([x.shape[0] for x in inputs], dtype=torch.long),
        tokens=pad_sequence(
            [torch.cat([torch.tensor([BOS_ID]), t]) for t in y],
            batch_first=True,
            padding_value=PAD_ID,
        ),
        labels=pad_sequence(targets, batch_first=True, padding_value=PAD_ID),
        label_lens=torch.tensor([len(t) for t in targets], dtype=torch.long),
        ctc_targets=pad_sequence(y, batch_first=True, padding_value=PAD_ID)
        if any(len(t) for t in y)
        else torch.zeros(len(y), 1, dtype=torch.long),
        ctc_lens=torch.tensor([len(t) for t in y], dtype=torch.long),
        durations=[float(e["duration"]) for e in examples],
        indices=[int(e["index"]) for e in examples],
        encoded=encoded,
        hidden=hidden,
    )
