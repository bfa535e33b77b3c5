"""How the server decodes one batch of requests: encode each request alone, decode them all
together, and hand each result out as soon as its sequence ends.

Why not ``Transcriber.transcribe_iter`` on the whole batch: it encodes the batch as one
padded tensor, and requests of mixed lengths make the encoder pay for the padding. Measured
on latent4ft (Whisper tiny.en encoder, 1 thread, the 10 bundled examples of 0.3-4.5 s): one
padded batch 0.54-1.02 s of encoder time, one request at a time 0.18-0.68 s; 8 equal-length
clips: 0.15-0.26 batched against 0.18-0.41 s one by one. The encoder runs once per request
and is not autoregressive, so batching saves it little; the decoder is called once per
token (or block of tokens), which is where sharing calls across requests pays.

Early exit: the decoding loop already drops finished rows from the batch
(``decoding.base.compact_finished``); :class:`_Reporting` wraps the strategy so that, at the
start of every decoder call, rows that finished before it are reported, and their requests
are answered while the rest of the batch is still decoding. Strategies with their own
``finalize`` or cache (the beam searches) report at the end of the batch.

Inputs that take another path in ``transcribe`` (shorter than a word, silent, longer than
``audio.MAX_SECONDS``, too long for the decoder's context) are transcribed alone by
``Transcriber.transcribe_iter``, so every request gets exactly the library's answer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speechllama.audio import MAX_SECONDS
from speechllama.decoding import DecodingOptions, DecodingResult, get_strategy
from speechllama.decoding.base import Decoded, Strategy, decode
from speechllama.decoding.state import DecodingState
from speechllama.features import compute_features, feature_frames
from speechllama.inputs import SAMPLE_RATE
from speechllama.segment import is_silent
from speechllama.transcribe import MIN_SPEECH_SECONDS

if TYPE_CHECKING:
    from speechllama.transcribe import Transcriber

__all__ = ["Engine", "OnResult"]

OnResult = Callable[[int, DecodingResult], None]
"""Called with (index in the batch, result) once per request, as soon as it is known."""


class Engine:
    """Transcribes batches of 16 kHz mono waveforms with one model and one strategy."""

    def __init__(self, transcriber: Transcriber, options: DecodingOptions) -> None:
        self.transcriber = transcriber
        self.options = options
        self.strategy = get_strategy(options, transcriber.model)
        transcriber.model.eval()

    @property
    def decoder_calls(self) -> int:
        """The model's running count of decoder calls (each batched call counts once)."""
        return self.transcriber.model.decoder_calls

    def run(self, waves: Sequence[np.ndarray], on_result: OnResult) -> None:
        """Transcribe ``waves`` (each (samples,) float32); ``on_result`` gets every one."""
        kind = self.transcriber.config.encoder.features
        library = [i for i, w in enumerate(waves) if _library_path(w, kind)]
        for i in library:
            on_result(i, self._alone(waves[i]))
        rows = [i for i in range(len(waves)) if i not in library]
        if not rows:
            return
        with torch.inference_mode(), self._autocast():
            embs, seconds = zip(*(self._encode(waves[i]) for i in rows), strict=True)
            cfg = self.transcriber.config
            limit = cfg.decoder.max_seq_len - 2 - self.strategy.lookahead
            fits = [r for r, emb in enumerate(embs) if emb.shape[0] <= limit]
            for r in range(len(rows)):
                if r not in fits:  # the library's error for audio the decoder cannot hold
                    on_result(rows[r], self._alone(waves[rows[r]]))
            if fits:
                self._decode(
                    [rows[r] for r in fits], [embs[r] for r in fits],
                    [seconds[r] for r in fits], waves, on_result,
                )  # fmt: skip

    def _decode(
        self,
        index: list[int],
        embs: list[torch.Tensor],
        encoder_seconds: list[float],
        waves: Sequence[np.ndarray],
        on_result: OnResult,
    ) -> None:
        """One batched decode of the encoded requests ``index`` (embeddings (S_i, d_model))."""
        cfg, tokenizer = self.transcriber.config, self.transcriber.tokenizer
        durations = [waves[i].shape[0] / SAMPLE_RATE for i in index]

        def finished(row: int, d: Decoded) -> None:
            result = DecodingResult(
                text=tokenizer.decode(list(d.tokens)),
                tokens=d.tokens,
                decoder_calls=d.decoder_calls,
                accepted_per_call=d.accepted_per_call,
                encoder_seconds=encoder_seconds[row],
                decoder_seconds=d.decoder_seconds,
                audio_seconds=durations[row],
            )
            on_result(index[row], result)

        reporting = _Reporting(self.strategy, finished)
        lens = torch.tensor([e.shape[0] for e in embs], dtype=torch.long, device=embs[0].device)
        outs = decode(
            self.transcriber.model,
            reporting,
            torch.nn.utils.rnn.pad_sequence(embs, batch_first=True),
            lens,
            durations,
            eos_id=cfg.eos_id,
            pad_id=cfg.pad_id,
            max_seq_len=cfg.decoder.max_seq_len,
        )
        for row, d in enumerate(outs):
            if row not in reporting.reported:
                finished(row, d)

    def _encode(self, wave: np.ndarray) -> tuple[torch.Tensor, float]:
        """(S, d_model) audio embeddings of one request, and the seconds they took (features,
        encoder, adapter), computed as ``transcribe`` computes them for a batch of one."""
        cfg = self.transcriber.config
        t0 = time.perf_counter()
        feats = compute_features(wave, cfg.encoder.features, cfg.encoder.n_mels)
        device = self.transcriber.device
        lens = torch.tensor([feats.shape[0]], dtype=torch.long, device=device)
        emb, emb_lens = self.transcriber.model.encode(feats[None].to(device), lens)
        return emb[0, : int(emb_lens[0])], time.perf_counter() - t0

    def _alone(self, wave: np.ndarray) -> DecodingResult:
        """The library's own result for one input (its special cases included)."""
        return next(iter(self.transcriber.transcribe_iter([wave], self.options)))[1]

    def _autocast(self) -> contextlib.AbstractContextManager:
        device = self.transcriber.device
        if self.options.fp16 and device.type == "cuda":
            return torch.autocast(device.type, dtype=torch.float16)
        return contextlib.nullcontext()


def _library_path(wave: np.ndarray, kind: str) -> bool:
    """Whether ``transcribe`` treats this input specially (no decoder call, an error, or
    segmentation), so the server leaves it to ``transcribe``."""
    n = wave.shape[0]
    return (
        n > MAX_SECONDS * SAMPLE_RATE
        or n < MIN_SPEECH_SECONDS * SAMPLE_RATE
        or feature_frames(n, kind) < 1
        or is_silent(wave, SAMPLE_RATE)
    )


class _Reporting(Strategy):
    """``inner`` with a report of each row as soon as it has finished (checked at the start of
    every decoder call, when the loop has booked the previous call to every row). A finished
    row is final: the loop feeds it pads and charges it nothing more, and ``finalize`` returns
    its tokens as they are, so the early report equals what ``decode`` returns for it."""

    def __init__(self, inner: Strategy, on_finished: Callable[[int, Decoded], None]) -> None:
        super().__init__(inner.options)
        self.inner = inner
        self.name = inner.name
        self.lookahead = inner.lookahead
        self.own_cache = inner.own_cache
        self.on_finished = on_finished
        self.early = not inner.own_cache and type(inner).finalize is Strategy.finalize
        self.reported: set[int] = set()

    @property
    def num_heads(self) -> int | None:
        return self.inner.num_heads

    def start(self, model: Any, cache: Any, logits: torch.Tensor, state: DecodingState):
        return self.inner.start(model, cache, logits, state)

    def advance(self, model: Any, cache: Any, state: DecodingState) -> None:
        if self.early:
            self._report(state)
        self.inner.advance(model, cache, state)

    def finalize(self, state: DecodingState) -> list[tuple[int, ...]]:
        return self.inner.finalize(state)

    def _report(self, state: DecodingState) -> None:
        for row in state.finished_rows():
            origin = row["origin"]
            if origin not in self.reported:
                self.reported.add(origin)
                self.on_finished(
                    origin,
                    Decoded(
                        tokens=tuple(row["tokens"]),
                        decoder_calls=row["calls"],
                        accepted_per_call=tuple(row["histogram"]),
                        decoder_seconds=row["decoder_seconds"],
                    ),
                )
