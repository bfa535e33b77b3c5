"""Data for one training run: manifests -> filtered datasets, encoder cache (and for heads-only
training the decoder hidden-state cache), dev batches.

Utterances that cannot be trained on (audio + transcript longer than the decoder context, or too
short to yield one audio embedding) are dropped up front and counted, rather than failing the
run hours in, at the batch that happens to hold them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speechllama.data.augment import AugmentConfig, Augmenter
from speechllama.data.manifest import load_manifest
from speechllama.data.sampler import DurationBucketSampler
from speechllama.features import SpecAugment, feature_frames
from speechllama.model.config import ModelConfig
from speechllama.text import Tokenizer
from speechllama.train.cache import EncoderCache, fingerprint
from speechllama.train.config import TrainConfig
from speechllama.train.data import SAMPLE_RATE, Batch, SpeechDataset, collate
from speechllama.train.hidden import (
    HIDDEN_PREFIX,
    HiddenCache,
    build_hidden_cache,
    hidden_fingerprint,
)
from speechllama.train.step import encoder_split

_MIN_SECONDS = 0.1


@dataclass
class RunData:
    """``train``: the training dataset; ``dev_batches``/``dev_texts``: fixed, unaugmented dev
    batches and raw dev transcripts by dataset index; ``cache``: the encoder cache in use (None:
    features are computed each epoch); ``spec_augment``: the masking module for training;
    ``skipped``: utterances dropped, by reason. With ``hidden`` (heads-only training on cached
    decoder hidden states) ``train`` and ``dev_batches`` serve those states, and
    ``dev_decode_batches`` the dev encoder outputs that greedy decoding needs."""

    train: SpeechDataset
    dev_batches: list[Batch]
    dev_texts: list[str]
    cache: EncoderCache | None
    spec_augment: torch.nn.Module | None
    skipped: dict[str, int]
    cache_stats: dict[str, float] | None = None
    hidden: HiddenCache | None = None
    hidden_stats: dict[str, float] | None = None
    dev_decode_batches: list[Batch] | None = None


def embeddings_for(seconds: float, cfg: ModelConfig) -> int:
    """Audio embeddings the model makes from ``seconds`` of audio (an upper estimate)."""
    frames = feature_frames(int(seconds * SAMPLE_RATE), cfg.encoder.features)
    return math.ceil(math.ceil(frames / cfg.encoder.subsampling) / cfg.adapter.stack)


def fitting(
    utterances: list[Any], tokenizer: Tokenizer, cfg: ModelConfig, stretch: float = 1.0
) -> tuple[list[Any], dict[str, int]]:
    """The utterances whose [audio][BOS] y [EOS] fits the decoder context (and, for Whisper,
    the encoder's 30 s window), and skip counts. ``stretch``: the most that augmentation can
    lengthen audio (1 / the slowest speed)."""
    from speechllama.text import target_ids

    max_seconds = math.inf
    if cfg.encoder.kind == "whisper":
        from speechllama.model.whisper_encoder import WHISPER_MAX_FRAMES

        max_seconds = WHISPER_MAX_FRAMES * cfg.encoder.subsampling / 100  # 100 mel frames/s
    kept, skipped = [], {"too_short": 0, "too_long": 0}
    for utt in utterances:
        seconds = utt.duration * stretch
        if utt.duration < _MIN_SECONDS:
            skipped["too_short"] += 1
        elif (
            seconds > max_seconds
            or embeddings_for(seconds, cfg) + len(target_ids(utt.text, tokenizer)) + 1
            > cfg.decoder.max_seq_len
        ):
            skipped["too_long"] += 1
        else:
            kept.append(utt)
    return kept, skipped


def wave_augmenter(spec: dict[str, Any] | None, seed: int) -> Augmenter | None:
    """The waveform augmentation ``spec`` (AugmentConfig fields; {} = its defaults) describes,
    or None when ``spec`` is None."""
    if spec is None:
        return None
    return Augmenter(AugmentConfig.from_dict(spec), seed)  # called as (wave, rng) -> wave


def encoder_cache_parts(cfg: TrainConfig, mcfg: ModelConfig) -> dict[str, Any]:
    """What the encoder cache's fingerprint hashes besides the encoder's weights.

    The augmentation config and the seed only shape copies 1..K-1; with one copy (clean) they are
    pinned to the values old caches were made with (None, 0), so that fine-tuning with another
    ``--seed`` reuses the cache instead of re-encoding every utterance (it cost 10 min per 22 h)."""
    augmented = cfg.cache_copies > 1
    return {
        "features": mcfg.encoder.features,
        "n_mels": mcfg.encoder.n_mels,
        # train_top=0 is left out so that caches made before the field existed stay valid.
        "encoder": {k: v for k, v in mcfg.encoder.__dict__.items() if k != "train_top" or v},
        "augment": cfg.augment if augmented else None,
        "seed": cfg.seed if augmented else 0,
    }


def prepare_data(
    cfg: TrainConfig,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    device: torch.device,
    out: Path,
    hidden: bool = False,
) -> RunData:
    """The run's data; ``hidden``: also cache the frozen trunk's final hidden states and serve
    those (needs the encoder cache: a frozen encoder and ``cfg.cache``)."""
    mcfg: ModelConfig = model.config
    augment = wave_augmenter(cfg.augment, cfg.seed)
    stretch = 1.0 / min(augment.config.speeds) if augment is not None else 1.0
    train_utts, skipped = fitting(load_manifest(cfg.train_manifest), tokenizer, mcfg, stretch)
    if not train_utts:
        raise ValueError(f"{cfg.train_manifest}: no utterance fits the model ({skipped})")
    dev_utts: list[Any] = []
    if cfg.dev_manifest:
        dev_utts, dev_skipped = fitting(load_manifest(cfg.dev_manifest), tokenizer, mcfg)
        skipped.update({f"dev_{k}": v for k, v in dev_skipped.items()})
    kind, n_mels = mcfg.encoder.features, mcfg.encoder.n_mels

    cache = None
    cache_stats = None
    split = encoder_split(model.encoder)
    frozen = split or not any(p.requires_grad for p in model.encoder.parameters())
    if frozen and cfg.cache:
        parts = encoder_cache_parts(cfg, mcfg)
        root = Path(cfg.cache_dir) if cfg.cache_dir else out / "encoder_cache"
        # With trained top blocks only the frozen part's weights decide the cached outputs (the
        # top's change every step, and a resumed run must find its cache).
        skip = model.encoder.top_prefixes() if split else ()
        encoder_fp = fingerprint(model.encoder, parts, skip=skip)
        cache = EncoderCache(root, encoder_fp, copies=cfg.cache_copies)
        model.encoder.eval()
        run = model.encoder.lower if split else model.encoder

        def encode(feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                hidden, hidden_lens = run(feats.to(device), lens.to(device))
            return hidden, hidden_lens

        common = {"feature_kind": kind, "n_mels": n_mels, "progress": cfg.progress}
        t0 = time.perf_counter()
        added = cache.build(train_utts, encode, augment=augment, seed=cfg.seed, **common)
        if dev_utts:
            added += cache.build(dev_utts, encode, copies=1, **common)
        cache_stats = {"encoded": added, "seconds": time.perf_counter() - t0, "entries": len(cache)}

    train = SpeechDataset(
        train_utts,
        tokenizer,
        feature_kind=kind,
        n_mels=n_mels,
        augment=None if cache is not None else augment,
        cache=cache,
        seed=cfg.seed,
    )
    dev = None
    if dev_utts:
        clean = _CleanCopy(cache) if cache is not None else None
        dev = SpeechDataset(dev_utts, tokenizer, feature_kind=kind, n_mels=n_mels, cache=clean)
    hidden_cache = hidden_stats = None
    if hidden:
        if cache is None:
            raise ValueError("cached decoder hidden states need the encoder cache (--cache)")
        hidden_root = Path(cfg.cache_dir) if cfg.cache_dir else out / "encoder_cache"
        hidden_cache = HiddenCache(
            hidden_root,
            HIDDEN_PREFIX + hidden_fingerprint(model, encoder_fp, tokenizer),
            copies=cfg.cache_copies,
        )
        t0 = time.perf_counter()
        common = {"device": device, "progress": cfg.progress}
        added = build_hidden_cache(
            hidden_cache, model, train.utterances, train.targets, cache,
            copies=cfg.cache_copies, **common,
        )  # fmt: skip
        if dev is not None:
            added += build_hidden_cache(
                hidden_cache, model, dev.utterances, dev.targets, cache, copies=1, **common
            )
        hidden_stats = {
            "encoded": added,
            "seconds": time.perf_counter() - t0,
            "entries": len(hidden_cache),
        }
        train.cache = hidden_cache  # the same copy per (epoch, index) as from the encoder cache

    dev_batches: list[Batch] = []
    dev_decode_batches: list[Batch] | None = None
    if dev is not None:
        order = list(
            DurationBucketSampler(dev.durations, cfg.max_duration, num_buckets=1, shuffle=False)
        )
        dev_batches = [
            collate([dev[i] for i in batch], encoded=cache is not None).to(device)
            for batch in order
        ]
        if hidden_cache is not None:  # the same batches, of cached hidden states, for the loss
            dev_decode_batches = dev_batches
            dev.cache = _CleanCopy(hidden_cache)
            dev_batches = [collate([dev[i] for i in b], hidden=True).to(device) for b in order]
    spec: torch.nn.Module | None = None
    if cfg.spec_augment and hidden_cache is None:
        # Cached encoder frames are not mel bins: mask them in time only.
        spec = SpecAugment(freq_masks=0) if cache is not None else SpecAugment()
    return RunData(
        train=train,
        dev_batches=dev_batches,
        dev_texts=[u.text for u in dev_utts],
        cache=cache,
        spec_augment=spec,
        skipped=skipped,
        cache_stats=cache_stats,
        hidden=hidden_cache,
        hidden_stats=hidden_stats,
        dev_decode_batches=dev_decode_batches,
    )


class _CleanCopy:
    """View of a cache that always serves copy 0 (dev data is never augmented)."""

    copies = 1

    def __init__(self, cache: EncoderCache) -> None:
        self._cache = cache

    def get(self, utt: Any, copy: int = 0) -> torch.Tensor:
        return self._cache.get(utt, 0)
