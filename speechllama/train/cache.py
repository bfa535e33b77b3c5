"""On-disk cache of frozen-encoder outputs, so a frozen encoder runs once per utterance instead
of once per epoch.

Why: with a pretrained frozen encoder (the ``small`` preset's Whisper tiny.en) the encoder costs
about as much as training the adapter and decoder, and its output for a given waveform never
changes. Outputs are stored as fp16 (half the disk of fp32, about 140 MB per audio hour at
50 Hz x 384; the encoder's own precision is not needed to train a decoder on them).

Layout: ``ROOT/<fingerprint>/shard-00000.safetensors ...``; each shard holds about
``shard_size`` tensors (T', d_enc) (it is closed after the first batch that fills it), named
by :func:`entry_key` (audio path + size + mtime + segment + copy). The fingerprint hashes
everything that changes the outputs: feature kind and size, the encoder config and its
weights, the augmentation config and seed. Shards are written to a temporary name and renamed
when complete, so an interrupted build loses only the shard in progress, and the index is
rebuilt from the shards' headers when the cache is opened.

Trade-off of caching with waveform augmentation: augmentation must happen *before* the encoder,
so the cache can only hold a fixed set of augmented versions. ``copies = K`` stores copy 0
clean and copies 1..K-1 each augmented once; every epoch draws one copy per utterance. K copies
cost K times the encoding time and disk, and the model sees at most K variants of an utterance
instead of a fresh one every epoch (which online encoding would give at the cost of running the
encoder every step). Feature-level SpecAugment cannot be applied to cached outputs; the loop
masks cached encoder frames in time instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from speechllama.features import compute_features
from speechllama.train.data import load_wave

SHARD_PREFIX = "shard-"
EncodeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
WaveAugment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class CacheError(OSError):
    """An unreadable cache entry; the message names the shard."""


def entry_key(utt: Any, copy: int) -> str:
    """Key of one cached output of ``utt`` (audio_filepath, offset, duration): changes when the
    file is replaced (size or mtime) or the segment moves."""
    path = Path(utt.audio_filepath).resolve()
    st = path.stat()
    offset = float(getattr(utt, "offset", 0.0) or 0.0)
    raw = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{offset:.4f}\0{utt.duration:.4f}\0{copy}"
    return hashlib.sha1(raw.encode()).hexdigest()


def fingerprint(encoder: torch.nn.Module, parts: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """Hash of the encoder weights and the JSON-able ``parts`` (feature config, augmentation).
    ``skip``: state-dict prefixes left out (trained top blocks that the cache does not run)."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        if skip and name.startswith(skip):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def duration_batches(durations: Sequence[float], batch_seconds: float) -> Iterator[tuple[int, int]]:
    """Consecutive (start, stop) runs of ``durations`` holding at most ``batch_seconds`` each
    (at least one item): sorted work batched so that padding stays small."""
    start = 0
    while start < len(durations):
        stop, total = start, 0.0
        while stop < len(durations) and (stop == start or total + durations[stop] <= batch_seconds):
            total += durations[stop]
            stop += 1
        yield start, stop
        start = stop


def _copy_rng(seed: int, copy: int, utt: Any) -> np.random.Generator:
    digest = hashlib.sha1(f"{utt.audio_filepath}@{getattr(utt, 'offset', 0.0)}".encode()).digest()
    return np.random.default_rng([seed, copy, int.from_bytes(digest[:8], "little")])


class EncoderCache:
    """Read/write access to one fingerprint's cached encoder outputs (``copies`` per utterance)."""

    def __init__(self, root: str | Path, fingerprint: str, copies: int = 1) -> None:
        self.dir = Path(root) / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.copies = copies
        self._index: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for shard in sorted(self.dir.glob(f"{SHARD_PREFIX}*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (not a dict)
                        self._index[key] = shard
            except SafetensorError:
                shard.unlink()  # damaged beyond its header: drop it, its entries get rebuilt
        numbers = [int(p.stem[len(SHARD_PREFIX) :]) for p in set(self._index.values())]
        self._next_shard = max(numbers, default=-1) + 1

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    what = "encoder cache"

    def key(self, utt: Any, copy: int) -> str:
        """Name of ``utt``'s copy ``copy`` in the shards (a subclass may hash more into it)."""
        return entry_key(utt, copy)

    def get(self, utt: Any, copy: int = 0) -> torch.Tensor:
        """Cached output (T', d_enc) fp16 of utterance ``utt``'s copy ``copy``."""
        key = self.key(utt, copy)
        shard = self._index.get(key)
        if shard is None:
            raise CacheError(
                f"{utt.audio_filepath}: copy {copy} is not in the {self.what} {self.dir}"
            )
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(shard), framework="pt")
        return handle.get_tensor(key)

    def missing(
        self, utterances: Sequence[Any], copies: int | None = None
    ) -> list[tuple[int, int]]:
        """(position in ``utterances``, copy) pairs not cached yet, for copies 0..copies-1
        (default: the cache's count)."""
        return [
            (i, c)
            for i, u in enumerate(utterances)
            for c in range(self.copies if copies is None else copies)
            if self.key(u, c) not in self._index
        ]

    def build(
        self,
        utterances: Sequence[Any],
        encode: EncodeFn,
        *,
        feature_kind: str,
        n_mels: int,
        augment: WaveAugment | None = None,
        seed: int = 0,
        batch_seconds: float = 160.0,
        shard_size: int = 512,
        copies: int | None = None,
        progress: bool = True,
    ) -> int:
        """Encode every (utterance, copy) not yet cached; returns how many were added.

        Copies > 0 go through ``augment`` with a generator seeded by (seed, copy, the row's
        key), so a rebuild gives the same audio. Work is length-sorted and batched by
        ``batch_seconds`` so padding stays small; ``copies`` overrides the cache's count (1 for
        a dev set, which is never augmented); ``encode`` (features (B,T,F), lens) ->
        (hidden (B,T',d), lens') runs under ``torch.inference_mode``."""
        copies = self.copies if copies is None else copies
        if copies > 1 and augment is None:
            raise ValueError("encoder cache copies > 1 need waveform augmentation (--augment)")
        todo = sorted(self.missing(utterances, copies), key=lambda ic: utterances[ic[0]].duration)
        pending: dict[str, torch.Tensor] = {}
        bar = tqdm(
            total=len(todo), desc="caching encoder outputs", unit="utt", disable=not progress
        )
        for start, stop in duration_batches(
            [utterances[i].duration for i, _ in todo], batch_seconds
        ):
            feats = []
            for i, copy in todo[start:stop]:
                wave = load_wave(utterances[i])
                if copy > 0 and augment is not None:
                    wave = augment(wave, _copy_rng(seed, copy, utterances[i]))
                feats.append(compute_features(wave, feature_kind, n_mels))
            lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
            with torch.inference_mode():
                padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
                hidden, out_lens = encode(padded, lens)
            for (i, copy), h, n in zip(todo[start:stop], hidden, out_lens.tolist(), strict=True):
                key = self.key(utterances[i], copy)
                pending[key] = h[:n].to(torch.float16).cpu().contiguous().clone()
            if len(pending) >= shard_size:
                self.add(pending)
                pending = {}
            bar.update(stop - start)
        if pending:
            self.add(pending)
        bar.close()
        return len(todo)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` (named by :meth:`key`) as one new shard, atomically."""
        shard = self.dir / f"{SHARD_PREFIX}{self._next_shard:05d}.safetensors"
        tmp = shard.with_name(f".{shard.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp))
        os.replace(tmp, shard)
        self._next_shard += 1
        for key in tensors:
            self._index[key] = shard
