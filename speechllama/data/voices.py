"""The synthetic voices: which ones exist, which set each belongs to, and how each is varied.

The recogniser's hardest problem is voice mismatch (DESIGN.md, "Measured facts"), so training
audio is spread over every engine and variant that works here, and two voices that training never
hears are kept apart to measure how far that transfers:

- training: espeak-ng (8 English accents x (default + 92 variants)), flite (kal16, awb, rms),
  festival (kal_diphone, ked_diphone) and the neural ``hibari-tts`` voice read with its US and
  its British spelling-to-sound rules; each utterance also gets a speed and a pitch factor.
- held out: festival ``cmu_us_slt_arctic_hts`` and the neural Piper voice ``en_US-joe-medium``.
  flite's ``slt`` is the same CMU ARCTIC speaker as the held-out HTS voice, so it is listed but
  kept out of the training set: training on it would make the held-out score look better than
  the voice transfer really is.

How each engine renders a ``Rendition`` is in ``engines.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
FLITE_F0 = {"kal16": 95.0, "awb": 123.0, "rms": None, "slt": 167.0}
# Festival diphone voices: (F0 target mean, F0 target std) of their intonation models.
FESTIVAL_F0 = {"kal_diphone": (105.0, 14.0), "ked_diphone": (105.0, 15.0)}
FESTIVAL_HTS = ("cmu_us_slt_arctic_hts",)

TRAIN_VOICES: tuple[Voice, ...] = (
    *(Voice("espeak-ng", a) for a in ESPEAK_ACCENTS),  # each accent's own default voice
    *(Voice("espeak-ng", f"{a}+{v}") for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS),
    *(Voice("flite", name) for name in ("kal16", "awb", "rms")),
    *(Voice("festival", name) for name in FESTIVAL_F0),
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
            known = ", ".join(("train", "heldout", "all", *ENGINES, "ENGINE/NAME"))
            raise ValueError(f"unknown voice or voice set {item!r} (known: {known})")
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
