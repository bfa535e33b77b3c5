"""``speechllama data synth``: read a sentence list with many synthetic voices, in parallel.

Output: ``DIR/manifest.jsonl`` (NeMo rows: ``audio_filepath`` relative to DIR, ``text`` = the
sentence exactly as given in the text file, ``duration``, ``id``, ``voice``/``speaker`` = the
voice id, ``source`` = the engine, plus ``speed`` and ``pitch``) and ``DIR/audio/NNNN/*.flac``
(16 kHz mono 16-bit FLAC).

Why it is built the way it is:

- Deterministic: utterance ``j`` gets its voice, speed and pitch from ``(seed, j)`` alone
  (``voices.choose_rendition``), whatever order the workers finish in.
- Resumable: a file's name holds a hash of its text and rendition, so an existing file is
  exactly the one this run would make and is reused; a changed seed or text makes a new name.
  Each FLAC is written to a temporary name and renamed, so a killed run never leaves a
  half-written file under a final name, and the manifest is written last, from what exists.
- Order: sentences are read in a random order fixed by the seed (``--in-order`` keeps the
  file's), because sentence lists come in corpus order and a small ``--hours`` would otherwise
  hear only the first corpus.
- ``--hours``: sentences are taken in that order until the durations, summed in that order,
  reach the target, so the cut is the same whatever the parallel timing was; files made past
  the cut are deleted.
- Files in ``audio/`` that the final manifest does not list (an earlier seed, text or cut) are
  deleted, so the folder holds exactly the manifest's audio.

CPU: one worker per core. On a 2-core machine never run it next to 2-thread training.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from speechllama.data.engines import SynthesisError, synthesize
from speechllama.data.voices import (
    DEFAULT_ENGINE_WEIGHTS,
    Rendition,
    Voice,
    choose_rendition,
    resolve_voices,
)

__all__ = [
    "SAMPLE_RATE",
    "Job",
    "SynthOptions",
    "SynthResult",
    "add_synth_arguments",
    "plan_jobs",
    "run_synth",
    "synth_main",
]

SAMPLE_RATE = 16000
MANIFEST = "manifest.jsonl"
_AUDIO = "audio"
_PER_FOLDER = 1000


@dataclass(frozen=True)
class SynthOptions:
    """What to synthesize. ``every_voice``: each sentence is read by every voice in ``voices``
    (a test set comparing voices on the same text); otherwise one voice per sentence.
    ``vary=False`` keeps each voice's default speed and pitch."""

    text: Path
    out: Path
    hours: float | None = None
    seed: int = 0
    voices: str = "train"
    every_voice: bool = False
    vary: bool = True
    engine_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ENGINE_WEIGHTS))
    jobs: int = max(1, os.cpu_count() or 1)
    limit: int | None = None
    in_order: bool = False
    id_prefix: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class Job:
    """Utterance ``number`` (its position in the plan): one sentence, one rendition, one file."""

    number: int
    text: str
    rendition: Rendition
    relpath: str


@dataclass(frozen=True)
class SynthResult:
    manifest: Path
    utterances: int
    seconds: float
    synthesized: int
    reused: int
    errors: tuple[str, ...]


def read_sentences(path: Path) -> list[str]:
    """Non-empty lines, stripped; a missing file is a one-line OSError naming it."""
    from speechllama.text import read_lines

    return [s for s in (line.strip() for line in read_lines(path)) if s]


def plan_jobs(sentences: list[str], voices: tuple[Voice, ...], opts: SynthOptions) -> Iterator[Job]:
    """Every utterance this run may make, in order; a pure function of its inputs (lazy, since
    ``--hours`` usually needs only a prefix of a long sentence list)."""
    groups = [(v,) for v in voices] if opts.every_voice else [voices]
    for i, text in enumerate(sentences):
        for k, pool in enumerate(groups):
            n = i * len(groups) + k
            r = choose_rendition(
                pool, opts.seed, n, vary=opts.vary, engine_weights=opts.engine_weights
            )
            digest = hashlib.sha1(f"{r.key}\n{text}".encode()).hexdigest()[:12]
            relpath = f"{_AUDIO}/{n // _PER_FOLDER:04d}/{n:07d}-{digest}.flac"
            yield Job(n, text, r, relpath)


def _make(job: Job, out: str) -> tuple[int, float, str | None]:
    """Worker: synthesize one job into its FLAC; (number, seconds, error or None)."""
    dest = Path(out) / job.relpath
    try:
        with tempfile.TemporaryDirectory(prefix="speechllama-synth-") as work:
            audio, rate = synthesize(job.rendition, job.text, Path(work))
        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
        peak = float(np.max(np.abs(audio)))
        if peak > 0.999:  # resampling can overshoot a full-scale engine output
            audio = audio * (0.999 / peak)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
        sf.write(tmp, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        os.replace(tmp, dest)
    except Exception as exc:  # one bad sentence must not stop a batch of thousands
        reason = str(exc) if isinstance(exc, SynthesisError) else f"{type(exc).__name__}: {exc}"
        return job.number, 0.0, f"utterance {job.number} ({job.rendition.voice.id}): {reason}"
    return job.number, len(audio) / SAMPLE_RATE, None


def _init_worker(parent: int) -> None:
    """Exit when the parent is gone: a killed run must not leave idle workers behind (they
    wait on a queue the dead parent can no longer close)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _existing_seconds(path: Path) -> float | None:
    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError):
        return None
    ok = info.samplerate == SAMPLE_RATE and info.channels == 1 and info.frames > 0
    return info.frames / SAMPLE_RATE if ok else None


def _results(jobs: Iterator[Job], opts: SynthOptions) -> Iterator[tuple[int, float, str | None]]:
    """(number, seconds, error) as they finish: reused files at once, new ones from workers.

    Jobs are planned and submitted lazily with at most ``4 * jobs`` in flight, so a stop at
    ``--hours`` wastes little. Closing the generator cancels what has not started and waits for
    what has, so no worker writes after the caller prunes.
    """
    pool = ProcessPoolExecutor(opts.jobs, initializer=_init_worker, initargs=(os.getpid(),))
    pending: set[Future[tuple[int, float, str | None]]] = set()
    try:
        for job in jobs:
            seconds = _existing_seconds(opts.out / job.relpath)
            if seconds is not None:
                yield job.number, seconds, "reused"
                continue
            pending.add(pool.submit(_make, job, str(opts.out)))
            while len(pending) >= 4 * opts.jobs:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_synth(opts: SynthOptions) -> SynthResult:
    """Synthesize, write the manifest, prune files it does not list; never raises for one bad
    sentence (it is reported in ``errors`` and left out)."""
    from speechllama.data.manifest import Utterance, write_manifest

    sentences = read_sentences(opts.text)[: opts.limit]
    if not sentences:
        raise ValueError(f"{opts.text}: no sentences")
    if not opts.in_order:
        order = np.random.default_rng(opts.seed).permutation(len(sentences))
        sentences = [sentences[i] for i in order]
    voices = resolve_voices(opts.voices)
    opts.out.mkdir(parents=True, exist_ok=True)
    planned: list[Job] = []

    def jobs() -> Iterator[Job]:
        for job in plan_jobs(sentences, voices, opts):
            planned.append(job)
            yield job

    count = len(sentences) * (len(voices) if opts.every_voice else 1)
    target = opts.hours * 3600 if opts.hours is not None else None
    seconds: dict[int, float] = {}
    errors: dict[int, str] = {}
    reused: set[int] = set()
    frontier, total = 0, 0.0  # utterances [0, frontier) are finished; total = their seconds
    cut = count
    bar = tqdm(
        total=round(target) if target else count,
        unit="s" if target else "utt",
        desc=f"synth {opts.out.name}",
        disable=not opts.progress,
        file=sys.stderr,
    )
    results = _results(jobs(), opts)
    try:
        for number, secs, err in results:
            if err is None or err == "reused":
                seconds[number] = secs
                if err:
                    reused.add(number)
            else:
                errors[number] = err
            bar.update(min(secs, bar.total - bar.n) if target else 1)
            while cut == count and (frontier in seconds or frontier in errors):
                total += seconds.get(frontier, 0.0)
                frontier += 1
                if target is not None and total >= target:
                    cut = frontier
            if cut < count:
                break
    finally:
        results.close()
        bar.close()
    kept = [j for j in planned[:cut] if j.number in seconds]
    prefix = opts.id_prefix if opts.id_prefix is not None else opts.out.name
    rows = [
        Utterance(
            audio_filepath=str((opts.out / j.relpath).absolute()),
            text=j.text,
            duration=round(seconds[j.number], 4),
            speaker=j.rendition.voice.id,
            voice=j.rendition.voice.id,
            source=j.rendition.voice.engine,
            id=f"{prefix}-{j.number:07d}",
            extra={"speed": j.rendition.speed, "pitch": j.rendition.pitch},
        )
        for j in kept
    ]
    manifest = opts.out / MANIFEST
    write_manifest(rows, manifest)
    _prune(opts.out, {j.relpath for j in kept})
    errs = tuple(errors[n] for n in sorted(errors) if n < cut)
    n_reused = sum(1 for j in kept if j.number in reused)
    seconds_kept = sum(r.duration for r in rows)
    return SynthResult(manifest, len(rows), seconds_kept, len(rows) - n_reused, n_reused, errs)


def _prune(out: Path, keep: set[str]) -> None:
    """Delete audio the manifest does not list and temporaries of killed runs."""
    root = out / _AUDIO
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.relative_to(out).as_posix() not in keep:
            path.unlink()
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


# --- command line ----------------------------------------------------------------------------


def _weights(spec: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or out[name] < 0:
            raise argparse.ArgumentTypeError(f"bad engine weight {item!r} (want ENGINE=NUMBER)")
    return out


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``speechllama data synth``."""
    parser.add_argument("--text", type=Path, required=True, help="sentences, one a line (.gz ok)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (manifest.jsonl)")
    parser.add_argument(
        "--hours", type=float, help="stop after this much audio (default: every sentence)"
    )
    parser.add_argument("--seed", type=int, default=0, help="voice/speed/pitch choice (default 0)")
    parser.add_argument(
        "--voices",
        default="train",
        help="train | heldout | all | engines | engine/name ids, comma-separated (default train)",
    )
    parser.add_argument(
        "--every-voice",
        action="store_true",
        help="each sentence read by every voice (test sets), instead of one voice per sentence",
    )
    parser.add_argument(
        "--no-vary", dest="vary", action="store_false", help="default speed and pitch only"
    )
    parser.add_argument(
        "--engine-weights",
        type=_weights,
        default=dict(DEFAULT_ENGINE_WEIGHTS),
        help="share of utterances per engine (default espeak-ng=0.4,flite=0.2,festival=0.15,"
        "hibari=0.25)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=max(1, os.cpu_count() or 1),
        help="worker processes (default: all cores; never next to training on a 2-core machine)",
    )
    parser.add_argument("--limit", type=int, help="use only the first N sentences of the file")
    parser.add_argument(
        "--in-order",
        action="store_true",
        help="read sentences in file order (default: an order shuffled by --seed)",
    )
    parser.add_argument("--id-prefix", help="utterance id prefix (default: the output folder name)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def synth_main(args: argparse.Namespace) -> int:
    """Run ``data synth``; 0 when every utterance was made, 1 when some failed (they are listed)."""
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    opts = SynthOptions(
        text=args.text,
        out=args.out,
        hours=args.hours,
        seed=args.seed,
        voices=args.voices,
        every_voice=args.every_voice,
        vary=args.vary,
        engine_weights=args.engine_weights,
        jobs=args.jobs,
        limit=args.limit,
        in_order=args.in_order,
        id_prefix=args.id_prefix,
        progress=args.progress,
    )
    result = run_synth(opts)
    for err in result.errors[:20]:
        print(f"speechllama data synth: {err}", file=sys.stderr)
    if len(result.errors) > 20:
        print(f"speechllama data synth: ... and {len(result.errors) - 20} more", file=sys.stderr)
    print(
        f"{result.manifest}: {result.utterances} utterances, {result.seconds / 3600:.2f} h "
        f"({result.synthesized} synthesized, {result.reused} reused, {len(result.errors)} failed)"
    )
    if opts.hours is not None and result.seconds < opts.hours * 3600:
        print(
            f"speechllama data synth: warning: {opts.text} ran out of sentences at "
            f"{result.seconds / 3600:.2f} h of the {opts.hours:g} h asked for",
            file=sys.stderr,
        )
    return 1 if result.errors else 0
