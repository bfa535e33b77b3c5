"""The Python transcription API: ``load_model(...).transcribe(audio)``, in the style of
openai/whisper.

Batches are formed in duration-sorted order (similar lengths waste little padding), results come
back in input order. A bad file in a list becomes a ``DecodingResult`` with ``error`` set and
the rest of the list is still transcribed; a single bad input raises its ``AudioError``.

Long and silent audio: an input longer than ``MAX_SECONDS`` is cut at its pauses and its
pieces are batched like any other input (``speechllama.inputs``); the pieces' results are
joined into one result per input (``extra["segments"]``). Audio with no frame above the
silence floor (digital silence, faint hiss), or shorter than a word can be (``min_speech``,
0.1 s), gets an empty transcript without a decoder call, so a model is never asked to invent
words for nothing (a 10 ms clip made a trained model say "eight").

Timing: ``encoder_seconds`` covers feature extraction, the encoder and the adapter (a batch's
share is split by audio duration); ``decoder_seconds`` covers the prefill and every decoder call
(see ``decoding.base.decode``). Reading and resampling files is not counted: it is I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speechllama.decoding import DecodingOptions, DecodingResult, get_strategy
from speechllama.decoding.base import Strategy, decode
from speechllama.inputs import (
    SAMPLE_RATE,
    AudioInput,
    Clip,
    Item,
    Pieces,
    split_input,
)
from speechllama.segment import SegmentOptions, is_silent

if TYPE_CHECKING:
    from speechllama.model.speechllama import SpeechLLaMA
    from speechllama.text import Tokenizer


MIN_SPEECH_SECONDS = SegmentOptions.min_speech
"""Shorter audio holds no word (a click at most): an empty transcript, no decoder call."""
# Checkpoints shipped inside the package (package-data "models/**/*"), by name; "default" is
# what load_model(None) and the CLI without --model use. Only the trained parts are shipped.
BUNDLED_MODELS = Path(str(importlib.resources.files("speechllama") / "models"))


class Transcriber:
    """A loaded model plus its tokenizer: everything needed to turn audio into text.

    Wrap a model that is being trained the same way (``Transcriber(model, tokenizer)``); the
    model is put in eval mode while transcribing and restored afterwards.
    """

    def __init__(
        self, model: SpeechLLaMA, tokenizer: Tokenizer, meta: dict[str, Any] | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.meta = dict(meta or {})

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def transcribe(
        self,
        audio: AudioInput | Sequence[AudioInput],
        options: DecodingOptions | None = None,
        **option_overrides: Any,
    ) -> DecodingResult | list[DecodingResult]:
        """Transcribe one input (a path or a 16 kHz mono float32 array) or a list of them.

        ``option_overrides`` replace fields of ``options``, e.g. ``batch_size=4``. One input
        returns one ``DecodingResult`` and raises on bad audio; a list returns a list in input
        order with ``error`` set on the bad ones."""
        options = dataclasses.replace(options or DecodingOptions(), **option_overrides)
        single = isinstance(audio, (str, os.PathLike, np.ndarray, Clip))
        inputs = [audio] if single else list(audio)
        results: list[DecodingResult | None] = [None] * len(inputs)
        for index, result in self.transcribe_iter(inputs, options, raise_errors=single):
            results[index] = result
        out = [r for r in results if r is not None]
        if single and out[0].error:
            raise ValueError(out[0].error)
        return out[0] if single else out

    def transcribe_iter(
        self,
        inputs: Sequence[AudioInput],
        options: DecodingOptions | None = None,
        raise_errors: bool = False,
    ) -> Iterator[tuple[int, DecodingResult]]:
        """Yield ``(input index, result)`` as each batch finishes (duration-sorted order), so
        callers can write results out as they come."""
        from speechllama.audio import AudioError

        options = options or DecodingOptions()
        strategy = get_strategy(options, self.model)
        items: list[Item] = []
        pieces: dict[int, Pieces] = {}
        for index, source in enumerate(inputs):
            try:
                parts, seconds = split_input(index, source)
            except AudioError as exc:
                if raise_errors:
                    raise
                yield index, _failed(Item(index, source), exc)
                continue
            if not parts:  # a long input without speech
                yield index, _empty(Item(index, source), seconds)
                continue
            if parts[0].piece is not None and not isinstance(source, Clip):
                pieces[index] = Pieces(len(parts), seconds)
            items.extend(parts)
        items.sort(key=lambda it: it.duration)
        size = max(1, options.batch_size)
        for start in range(0, len(items), size):
            batch = items[start : start + size]
            for item, result in self._batch(batch, options, strategy, raise_errors):
                if item.index not in pieces:
                    yield item.index, result
                    continue
                joined = pieces[item.index].add(item.piece, result)
                if joined is not None:
                    del pieces[item.index]
                    yield item.index, joined

    def _batch(
        self, items: list[Item], options: DecodingOptions, strategy: Strategy, raise_errors: bool
    ) -> Iterator[tuple[Item, DecodingResult]]:
        from speechllama.audio import AudioError
        from speechllama.features import feature_frames

        kind = self.config.encoder.features
        waves: list[np.ndarray] = []
        kept: list[Item] = []
        for item in items:
            try:
                wave = item.load()
                if feature_frames(wave.shape[0], kind) < 1:  # would fail the whole batch
                    name = item.name or "audio array"
                    secs = wave.shape[0] / SAMPLE_RATE
                    raise AudioError(name, f"too short ({secs * 1000:.0f} ms) for one frame")
                if wave.shape[0] < MIN_SPEECH_SECONDS * SAMPLE_RATE or is_silent(wave, SAMPLE_RATE):
                    yield item, _empty(item, wave.shape[0] / SAMPLE_RATE)  # nothing to say
                    continue
            except AudioError as exc:
                if raise_errors:
                    raise
                yield item, _failed(item, exc)
                continue
            waves.append(wave)
            kept.append(item)
        if kept:
            yield from zip(kept, self._decode(kept, waves, options, strategy), strict=True)

    def _decode(
        self, items: list[Item], waves: list[np.ndarray], options: DecodingOptions, strategy
    ) -> list[DecodingResult]:
        from speechllama.features import compute_features

        model, cfg = self.model, self.config
        device = self.device
        durations = [w.shape[0] / SAMPLE_RATE for w in waves]
        was_training = model.training
        model.eval()
        autocast = (
            torch.autocast(device.type, dtype=torch.float16)
            if options.fp16 and device.type == "cuda"
            else contextlib.nullcontext()
        )
        try:
            with torch.inference_mode(), autocast:
                t0 = time.perf_counter()
                feats = [
                    compute_features(w, cfg.encoder.features, cfg.encoder.n_mels) for w in waves
                ]
                lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
                batch = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
                emb, emb_lens = model.encode(batch.to(device), lens.to(device))
                encoder_seconds = time.perf_counter() - t0
                # Audio that fills the decoder context cannot be transcribed; fail only it.
                limit = cfg.decoder.max_seq_len - 2 - strategy.lookahead
                fits = [i for i, n in enumerate(emb_lens.tolist()) if n <= limit]
                decoded = {}
                if fits:
                    rows = torch.tensor(fits, device=emb.device)
                    outs = decode(
                        model,
                        strategy,
                        emb.index_select(0, rows),
                        emb_lens.index_select(0, rows),
                        [durations[i] for i in fits],
                        eos_id=cfg.eos_id,
                        pad_id=cfg.pad_id,
                        max_seq_len=cfg.decoder.max_seq_len,
                    )
                    decoded = dict(zip(fits, outs, strict=True))
        finally:
            model.train(was_training)
        total = sum(durations) or 1.0
        results = []
        for i, (item, dur) in enumerate(zip(items, durations, strict=True)):
            d = decoded.get(i)
            if d is None:
                error = f"{item.name or 'audio array'}: {dur:.1f} s is too long for this model"
                results.append(
                    dataclasses.replace(_failed(item, ValueError(error)), audio_seconds=dur)
                )
                continue
            results.append(
                DecodingResult(
                    text=self.tokenizer.decode(list(d.tokens)),
                    tokens=d.tokens,
                    decoder_calls=d.decoder_calls,
                    accepted_per_call=d.accepted_per_call,
                    encoder_seconds=encoder_seconds * dur / total,
                    decoder_seconds=d.decoder_seconds,
                    audio_seconds=dur,
                    audio_filepath=item.name,
                )
            )
        return results


def _failed(item: Item, exc: Exception) -> DecodingResult:
    return DecodingResult(
        text="", tokens=(), decoder_calls=0, audio_filepath=item.name, error=str(exc)
    )


def _empty(item: Item, seconds: float) -> DecodingResult:
    """The result for audio without speech: an empty transcript, no decoder call."""
    return DecodingResult(
        text="", tokens=(), decoder_calls=0, audio_seconds=seconds, audio_filepath=item.name
    )


def resolve_model_dir(name_or_path: str | os.PathLike | None) -> Path:
    """None or ``"default"`` -> the bundled default model; a bundled name -> that model;
    anything else must be a checkpoint directory. Missing ones raise ``FileNotFoundError``.
    None never means a folder that happens to be called ``default`` in the working directory."""
    name = "default" if name_or_path is None else os.fspath(name_or_path)
    path = Path(name).expanduser()
    if name_or_path is not None and path.is_dir():
        return path
    bundled = BUNDLED_MODELS / name
    if os.sep not in name and "/" not in name and bundled.is_dir():
        return bundled
    if name == "default":
        raise FileNotFoundError(
            f"no bundled model in this install; pass --model DIR (no default model at {bundled}; "
            "train one with `speechllama train`, ship one with `speechllama export`)"
        )
    raise FileNotFoundError(f"{name}: no such model directory or bundled model name")


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str = "cpu",
    merge_lora: bool = True,
    precision: str = "float32",
    compile: bool = False,
    encoder_precision: str = "auto",
) -> Transcriber:
    """Load a checkpoint directory (config.json + model.safetensors + tokenizer.model) or a
    bundled model by name (None or ``"default"``: the default model). A sourced preset name
    (``"smollm"``) with no bundled checkpoint builds that preset from its installed packages,
    adapter and heads untrained (``meta`` is then ``{"preset": name}``). ``merge_lora``: fold
    LoRA deltas into the decoder (faster calls; False keeps them apart, e.g. to count them).
    ``precision``: the decoder's at decode time, "float32", "bfloat16" or "int8" (see
    ``SpeechLLaMA.set_decode_precision``); other than float32 it is recorded in ``meta``, so
    a resumed evaluation never mixes hypotheses of two precisions. ``compile``: decoder calls
    through ``torch.compile`` (``SpeechLLaMA.compile_calls``; float32 or bfloat16).
    ``encoder_precision``: "auto" (bf16 on a CPU with AMX, else fp32), "float32" or "bfloat16"
    (``SpeechLLaMA.set_encoder_precision``); a bf16 encoder is recorded in ``meta``."""
    from speechllama.checkpoint import load_checkpoint
    from speechllama.model.config import SOURCED_PRESETS

    try:
        path = resolve_model_dir(name_or_path)
    except FileNotFoundError:
        if not isinstance(name_or_path, str) or name_or_path not in SOURCED_PRESETS:
            raise
        from speechllama.model.sourced import model_from_preset

        model, tokenizer = model_from_preset(name_or_path, device=device)
        meta: dict[str, Any] = {"preset": name_or_path}
    else:
        model, tokenizer, meta = load_checkpoint(path, device=device, merge_lora=merge_lora)
    model.set_decode_precision(precision)
    model.set_encoder_precision(encoder_precision)
    if compile:
        model.compile_calls()
    if precision != "float32":
        meta = {**meta, "decode_precision": precision}
    if model.encoder_dtype != torch.float32:
        meta = {**meta, "encoder_precision": str(model.encoder_dtype).removeprefix("torch.")}
    return Transcriber(model, tokenizer, meta)
