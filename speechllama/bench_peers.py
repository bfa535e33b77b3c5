"""Other recognisers side by side with ours: WER and RTF per system per test set, one table.

Why a separate bench from ``speechllama bench``: that one compares our decoding methods on
shared audio embeddings; the peers here are whole systems (their own features, encoder and
decoder), so each gets the 16 kHz waveform and is timed end to end on it.

How it stays fair on a shared machine:

- audio is read and resampled once, untimed, and every system gets the same float32 arrays;
  model loading is not timed either;
- each system is warmed up on the first utterance before anything is timed;
- the utterances go in chunks, and the systems take turns chunk by chunk, in an order rotated
  from chunk to chunk, so load from other processes hits them alike;
- threads are fixed (2 by default: torch intra- and inter-op for ours, ``cpu_threads`` for
  CTranslate2); pocketsphinx is single-threaded and the table says so.

WER is :func:`speechllama.evaluate.evaluate_results` (jiwer on the project's normaliser), as in
``speechllama evaluate``; RTF = processing seconds / audio seconds. For our model the
processing seconds are ``encoder_seconds + decoder_seconds`` of its ``DecodingResult`` objects, the
sums ``speechllama evaluate`` reports. With the same decoding flags and ``--batch-size 1`` (the
script's default; larger batches are formed within a chunk) its transcripts, and so its WER, are
those of ``speechllama evaluate --batch-size 1``.
The systems themselves are in ``speechllama.peers``.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from speechllama.evaluate import evaluate_results
from speechllama.peers import SAMPLE_RATE, Hypothesis, OurModel, System, build_peers

# --- data and the run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """A manifest's loadable utterances as 16 kHz arrays; ``errors``: one line per utterance
    whose audio failed (left out for every system)."""

    name: str
    waves: tuple[np.ndarray, ...]
    refs: tuple[str, ...]
    sources: tuple[str, ...]
    errors: tuple[str, ...]


def short_source(source: str | None) -> str:
    """A manifest ``source`` without its parenthesised provenance ("LJSpeech-1.1 (via ...)")."""
    return (source or "unknown").split(" (", 1)[0].strip() or "unknown"


def load_set(name: str, manifest: str | Path, limit: int | None = None) -> EvalSet:
    """Read ``manifest`` (NeMo JSONL) and its audio; bad audio becomes an error line."""
    from speechllama.audio import AudioError, load_audio
    from speechllama.data.manifest import load_manifest

    utts = load_manifest(manifest, check_audio=False)[:limit]
    waves, refs, sources, errors = [], [], [], []
    for u in utts:
        try:
            wave = load_audio(
                u.audio_filepath,
                max_seconds=None,
                offset=u.offset,
                duration=u.duration if u.offset else None,
            )
        except AudioError as err:
            errors.append(str(err))
            continue
        waves.append(wave)
        refs.append(u.text)
        sources.append(short_source(u.source))
    if not waves:
        raise ValueError(f"{manifest}: no utterance could be loaded")
    return EvalSet(name, tuple(waves), tuple(refs), tuple(sources), tuple(errors))


@dataclass(frozen=True)
class PeerRow:
    """One system on one set (or on one ``source`` of it, ``set`` = "SET/SOURCE")."""

    system: str
    set: str
    wer: float
    substitutions: int
    deletions: int
    insertions: int
    words: int
    utterances: int
    failed: int
    audio_seconds: float
    seconds: float
    rtf: float
    threads: int


def score(
    system: System, set_name: str, data: EvalSet, hyps: Sequence[Hypothesis], keep: Sequence[int]
) -> PeerRow:
    """The row of ``system`` over the utterances ``keep`` of ``data``; failed ones unscored."""
    ok = [i for i in keep if hyps[i].error is None]
    counts = evaluate_results([data.refs[i] for i in ok], [hyps[i].text for i in ok])
    audio = sum(data.waves[i].shape[0] for i in ok) / SAMPLE_RATE
    seconds = sum(hyps[i].seconds for i in ok)
    return PeerRow(
        system=system.name,
        set=set_name,
        wer=counts["wer"],
        substitutions=counts["substitutions"],
        deletions=counts["deletions"],
        insertions=counts["insertions"],
        words=counts["words"],
        utterances=len(ok),
        failed=len(keep) - len(ok),
        audio_seconds=audio,
        seconds=seconds,
        rtf=seconds / audio if audio else 0.0,
        threads=system.threads,
    )


def run_set(
    systems: Sequence[System], data: EvalSet, chunk: int = 16, by_source: bool = False
) -> tuple[list[PeerRow], list[str]]:
    """Every system on every utterance of ``data`` as the module doc describes. Returns one row
    per system (then, with ``by_source`` and more than one source, one per source and system)
    and the error lines of utterances a system failed on."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if not systems:
        raise ValueError("no system to run")
    n = len(data.waves)
    for system in systems:  # warm-up, not timed
        system.transcribe(data.waves[:1])
    hyps: dict[str, list[Hypothesis]] = {s.name: [] for s in systems}
    for c, start in enumerate(range(0, n, chunk)):
        waves = data.waves[start : start + chunk]
        shift = c % len(systems)
        done = {s.name: s.transcribe(waves) for s in [*systems[shift:], *systems[:shift]]}
        for name, outs in done.items():
            if len(outs) != len(waves):
                raise RuntimeError(f"{name} returned {len(outs)} results for {len(waves)} inputs")
            hyps[name] += outs
    groups = {data.name: list(range(n))}
    if by_source and len(set(data.sources)) > 1:
        for i, source in enumerate(data.sources):
            groups.setdefault(f"{data.name}/{source}", []).append(i)
    rows = [
        score(s, name, data, hyps[s.name], keep) for name, keep in groups.items() for s in systems
    ]
    errors = [f"{s.name}: {data.name}: {h.error}" for s in systems for h in hyps[s.name] if h.error]
    return rows, errors


def measure(
    args: Any, peers: Sequence[str], with_model: bool, sets: Sequence[tuple[str, Path]]
) -> tuple[list[PeerRow], list[str]]:
    """The peers script's work in this process: ``peers`` and, with ``with_model``, our model
    (``args``: the script's options) on every ``(name, manifest)`` of ``sets``."""
    from speechllama.cli.bench import set_threads
    from speechllama.cli.transcribe import decoding_options

    set_threads(args.threads)
    systems = build_peers(list(peers), args.threads)
    if with_model:
        from speechllama.transcribe import load_model

        model = load_model(args.model, device=args.device, precision=args.dtype,
                           compile=args.compile, encoder_precision=args.encoder_dtype)  # fmt: skip
        where = Path(args.model)
        name = f"speechllama {where.parent.name}/{where.name}" if where.is_dir() else None
        name = (name or "speechllama") + ("" if args.dtype == "float32" else f" {args.dtype}")
        name += " compiled" if args.compile else ""
        name += " bf16-encoder" if model.meta.get("encoder_precision") == "bfloat16" else ""
        # Batched rows are throughput, not latency: the table must say which it is.
        name += f" batch {args.batch_size}" if args.batch_size != 1 else ""
        systems.insert(0, OurModel(model, decoding_options(args), name))
    rows: list[PeerRow] = []
    errors: list[str] = []
    for set_name, path in sets:
        data = load_set(set_name, path, args.limit)
        errors += [f"{set_name}: {e}" for e in data.errors]
        set_rows, set_errors = run_set(systems, data, args.chunk, args.by_source)
        rows += set_rows
        errors += set_errors
    return rows, errors


def measure_isolated(
    args: Any, peers: Sequence[str], with_model: bool, sets: Sequence[tuple[str, Path]]
) -> tuple[list[PeerRow], list[str]]:
    """``measure`` with each system in a fresh process of its own, one after another. Why:
    once faster-whisper (CTranslate2) has run in a process, our decoding in that process stays
    about 1.4x slower (session 9; idle threads use no CPU and the affinity is unchanged, so the
    cause is open). Rows come in ``measure``'s order: per set, every system in turn."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    units: list[str | None] = [None] if with_model else []
    units += list(peers)
    done = []
    for unit in units:
        ctx = multiprocessing.get_context("spawn")  # fresh: no runtime from another system
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            only = [] if unit is None else [unit]
            done.append(pool.submit(measure, args, only, unit is None, sets).result())
    order: dict[str, int] = {}
    for rows, _ in done:
        for row in rows:
            order.setdefault(row.set, len(order))
    ranked = sorted(
        ((row, u) for u, (rows, _) in enumerate(done) for row in rows),
        key=lambda ru: (order[ru[0].set], ru[1]),
    )
    return [row for row, _ in ranked], [e for _, errors in done for e in errors]


# --- output -------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def header(chunk: int, isolated: bool = False) -> dict[str, Any]:
    """The machine and library versions the numbers come from."""
    import speechllama
    from speechllama.bench import cpu_model

    libs = ("torch", "faster-whisper", "ctranslate2", "pocketsphinx")
    # the package's own version, not the installed metadata, which an editable install
    # freezes at whatever version it was installed with
    versions = {"speechllama": speechllama.__version__}
    versions |= {d: v for d in libs if (v := _version(d)) is not None}
    return {
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "versions": versions,
        "chunk": chunk,
        "isolated": isolated,
    }


def format_table(rows: Sequence[PeerRow], head: dict[str, Any] | None = None) -> str:
    """One line per system and set: utterances, audio seconds, WER, RTF, threads."""
    lines = []
    if head:
        versions = ", ".join(f"{k} {v}" for k, v in head["versions"].items())
        lines += [
            f"{head['cpu']} | python {head['python']} | {versions}",
            "warm-up, then each system alone in a fresh process"
            if head.get("isolated")
            else f"warm-up, then systems take turns every {head['chunk']} utterances",
            "",
        ]
    width = max([len(r.system) for r in rows] + [6])
    sets = max([len(r.set) for r in rows] + [3])
    lines.append(
        f"{'system':<{width}}  {'set':<{sets}}  {'utts':>5} {'audio s':>8} "
        f"{'WER':>7} {'RTF':>7} {'threads':>7}"
    )
    for r in rows:
        failed = f"  ({r.failed} failed)" if r.failed else ""
        lines.append(
            f"{r.system:<{width}}  {r.set:<{sets}}  {r.utterances:5d} "
            f"{r.audio_seconds:8.1f} {100 * r.wer:6.2f}% {r.rtf:7.4f} "
            f"{r.threads:7d}{failed}"
        )
    lines += [
        "",
        "WER: jiwer on speechllama.text.normalize'd text; RTF = processing seconds "
        "(model load and audio reading excluded) / audio seconds",
    ]
    return "\n".join(lines)


def to_json(rows: Sequence[PeerRow], head: dict[str, Any], errors: Sequence[str]) -> dict:
    """The JSON document the script writes: header, rows, errors."""
    return {"header": head, "rows": [asdict(r) for r in rows], "errors": list(errors)}
