"""``speechllama bench``: every decoding method on the same utterances, in one process, side by
side: WER, decoder calls, tokens per call, decoder seconds, speed-up against our greedy, RTF.

Why it is built this way (fewer calls do not always mean less time, so the timing must be fair):

- every utterance is encoded **once** and all methods decode the same audio embeddings; the
  encoder time (with repeats: the median of timing-only re-encodings) is reported once and
  added to each method's decoder time for its RTF;
- each method is warmed up on one utterance before anything is timed;
- the timed decoding is repeated ``repeats`` times and the median taken; within a repeat the
  methods take turns batch by batch, in an order rotated from batch to batch, so load from
  other processes on a shared machine hits all of them alike;
- speed-up is greedy's decoder seconds over the method's, both measured in the same run;
- threads are fixed by the caller (the CLI sets them) and printed in the header.

What runs is :mod:`speechllama.bench_methods` (methods, runners) and, for the
``transformers`` peers, :mod:`speechllama.bench_hf`. Results: :class:`BenchReport`, printed by
:func:`format_table`, saved by :func:`write_json` and :func:`plot_wer_vs_calls`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speechllama.bench_methods import (
    EncodedBatch,
    Method,
    Output,
    Runner,
    StrategyRunner,
    build_runners,
)
from speechllama.decoding import DecodingOptions
from speechllama.decoding.base import max_tokens_for
from speechllama.evaluate import evaluate_results
from speechllama.model.pack_tuning import call_sizes

if TYPE_CHECKING:
    from speechllama.data.manifest import Utterance
    from speechllama.model.config import FeatureKind
    from speechllama.transcribe import Transcriber

SAMPLE_RATE = 16_000


def encode_all(
    transcriber: Transcriber,
    waves: Sequence[np.ndarray],
    options: DecodingOptions,
    room: int,
    repeats: int = 1,
) -> tuple[list[EncodedBatch], dict[int, float], dict[int, str]]:
    """Encode every wave once, in duration-sorted batches of ``options.batch_size``; every
    method decodes these embeddings. With ``repeats`` > 1 each batch is encoded that many
    times for timing only (median kept), since a single pass on a shared machine can be off
    several-fold; the embeddings are always the first pass's.

    Returns the batches, each utterance's share of encoder seconds (features + encoder +
    adapter; a batch's time split by duration) and the utterances whose audio embeddings leave
    fewer than ``room`` decoder positions (too long for the decoder)."""
    from speechllama.features import compute_features

    model, cfg = transcriber.model, transcriber.config
    device = transcriber.device
    limit = cfg.decoder.max_seq_len - room

    def encode(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [compute_features(w, cfg.encoder.features, cfg.encoder.n_mels) for w in rows]
        lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
        batch = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
        return model.encode(batch.to(device), lens.to(device))

    encode(list(waves[:1]))  # warm-up, not timed
    order = sorted(range(len(waves)), key=lambda i: waves[i].shape[0])
    size = max(1, options.batch_size)
    batches, enc_seconds, too_long = [], {}, {}
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            encoded = encode([waves[i] for i in chunk])
            if device.type == "cuda":  # kernels run asynchronously: wait before reading time
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            if r == 0:
                audio, lens = encoded
        seconds = statistics.median(times)
        durations = [waves[i].shape[0] / SAMPLE_RATE for i in chunk]
        total = sum(durations) or 1.0
        keep = []
        for j, (i, n) in enumerate(zip(chunk, lens.tolist(), strict=True)):
            if n > limit:
                too_long[i] = f"{durations[j]:.1f} s is too long for this model"
                continue
            enc_seconds[i] = seconds * durations[j] / total
            keep.append(j)
        if not keep:
            continue
        rows = torch.tensor(keep, device=audio.device)
        kept_lens = lens.index_select(0, rows)
        kept_durations = tuple(durations[j] for j in keep)
        limits = tuple(
            min(max_tokens_for(d, options), cfg.decoder.max_seq_len - n - 2)
            for d, n in zip(kept_durations, kept_lens.tolist(), strict=True)
        )
        audio = audio.index_select(0, rows)[:, : int(kept_lens.max())]
        batches.append(EncodedBatch(tuple(chunk[j] for j in keep), audio, kept_lens,
                                    kept_durations, limits))  # fmt: skip
    return batches, enc_seconds, too_long


# --- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchReport:
    """``rows``: one dict per method that ran (keys in ``ROW_KEYS`` first); ``header``: the
    machine and run settings; ``notes``: skipped methods and caveats; ``errors``: one line per
    utterance that could not be decoded (left out of every row)."""

    rows: tuple[dict[str, Any], ...]
    header: dict[str, Any]
    notes: tuple[str, ...]
    errors: tuple[str, ...]


ROW_KEYS = ("method", "wer", "calls_per_utt", "tokens_per_call", "decoder_seconds", "speedup",
            "rtf", "encoder_seconds", "encoder_rtf", "decoder_rtf", "identical_to_greedy",
            "batch_size", "utterances")  # fmt: skip


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _load(utt: Utterance, features: FeatureKind) -> np.ndarray:
    """The utterance's samples (its segment when the manifest gives an ``offset``); raises
    ``AudioError`` for unreadable audio, an empty segment or audio shorter than one frame."""
    from speechllama.audio import AudioError, load_audio
    from speechllama.features import feature_frames

    if not utt.offset:
        wave = load_audio(utt.audio_filepath)  # transcribe's length cap applies
    else:
        wave = load_audio(utt.audio_filepath, max_seconds=None)
        start = round(utt.offset * SAMPLE_RATE)
        wave = wave[start : start + round(utt.duration * SAMPLE_RATE)]
    if feature_frames(wave.shape[0], features) < 1:
        raise AudioError(utt.audio_filepath, f"too short ({wave.shape[0] / 16:.0f} ms)")
    return wave


@torch.inference_mode()
def run_bench(
    transcriber: Transcriber,
    utterances: Sequence[Utterance],
    methods: Sequence[Method],
    options: DecodingOptions,
    repeats: int = 1,
) -> BenchReport:
    """Run ``methods`` (from :func:`parse_methods`; the first must be greedy) on
    ``utterances`` as the module doc describes; ``options`` carries the batch size and the
    length limits shared by all of them. Threads are the caller's to fix beforehand."""
    from speechllama.audio import AudioError

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not methods or methods[0].name != "greedy":
        raise ValueError("the first method must be greedy (the reference); use parse_methods")
    model = transcriber.model
    was_training = model.training
    model.eval()
    try:
        notes: list[str] = []
        runners = build_runners(transcriber, methods, notes)
        waves, refs, ids, errors = [], [], [], []
        for utt in utterances:
            try:
                waves.append(_load(utt, transcriber.config.encoder.features))
            except AudioError as err:
                errors.append(str(err))
                continue
            refs.append(utt.text)
            ids.append(utt.audio_filepath)
        if not waves:
            raise ValueError("no utterance could be loaded: " + "; ".join(errors[:3]))
        lookahead = max(r.lookahead for r in runners.values())
        room = 2 + lookahead
        # the packed-weight choice of every call size, measured before anything is timed
        model.tune_packing(call_sizes(options.batch_size, lookahead))
        batches, enc_seconds, too_long = encode_all(transcriber, waves, options, room, repeats)
        errors += [f"{ids[i]}: {msg}" for i, msg in sorted(too_long.items())]
        if not batches:
            raise ValueError("no utterance fits the model: " + "; ".join(errors[:3]))
        seconds, outputs = _timed(runners, batches, repeats, notes)
    finally:
        model.train(was_training)
    kept = sorted(enc_seconds)
    rows = _rows(
        transcriber,
        runners,
        kept,
        [refs[i] for i in kept],
        outputs,
        seconds,
        sum(enc_seconds.values()),
        sum(waves[i].shape[0] for i in kept) / SAMPLE_RATE,
    )
    if options.batch_size > 1 and any(r.batch_size == 1 for r in runners.values()):  # hf-*
        notes.append("hf-* peers run at batch 1 (see speechllama.bench_hf); compare them with "
                     "our methods at --batch-size 1")  # fmt: skip
    header = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "cpu": cpu_model(),
        "device": str(transcriber.device), "batch_size": options.batch_size, "repeats": repeats,
        "utterances": len(kept), "audio_seconds": rows[0]["audio_seconds"],
        "encoder_seconds": rows[0]["encoder_seconds"],
        "heads": options.num_heads or model.config.heads.num_heads,
        "precision": transcriber.meta.get("decode_precision", "float32"),
        "encoder_precision": transcriber.meta.get("encoder_precision", "float32"),
        "compiled": model.compiled is not None,
    }  # fmt: skip
    if any(not isinstance(r, StrategyRunner) for r in runners.values()):
        from speechllama.bench_hf import transformers_version

        header["transformers"] = transformers_version()
    return BenchReport(tuple(rows), header, tuple(notes), tuple(errors))


def _timed(
    runners: dict[str, Runner], batches: list[EncodedBatch], repeats: int, notes: list[str]
) -> tuple[dict[str, list[float]], dict[str, dict[int, Output]]]:
    """Warm each runner up on one utterance, then ``repeats`` interleaved timed passes.
    Returns per-method seconds per repeat and the first repeat's outputs by utterance.

    A peer whose library refuses the call in the warm-up (e.g. an older transformers without
    prompt lookup on ``inputs_embeds``) is dropped from ``runners`` with a note; our own
    strategies are never excused."""
    for name in list(runners):
        runner = runners[name]
        compiling = isinstance(runner, StrategyRunner) and runner.compiled is not None
        try:
            t0 = time.perf_counter()
            if compiling:
                runner.warm_up()
            runner.run(batches[0].first())
            if compiling:  # what a user waits once
                warm = time.perf_counter() - t0
                notes.append(f"{name}: warm-up (compiling its decoder calls) took {warm:.1f} s")
        except (ValueError, TypeError, NotImplementedError) as err:
            if isinstance(runners[name], StrategyRunner):
                raise
            del runners[name]
            notes.append(f"skipped {name}: unsupported by the installed library ({err})")
    names = list(runners)
    seconds = {name: [0.0] * repeats for name in names}
    outputs: dict[str, dict[int, Output]] = {name: {} for name in names}
    unstable: set[str] = set()
    for r in range(repeats):
        for b, batch in enumerate(batches):
            shift = (r + b) % len(names)  # who goes first moves on each batch and repeat
            for name in names[shift:] + names[:shift]:
                outs, secs = runners[name].run(batch)
                seconds[name][r] += secs
                for i, out in zip(batch.indices, outs, strict=True):
                    if r == 0:
                        outputs[name][i] = out
                    elif outputs[name][i] != out:
                        unstable.add(name)
    notes += [f"{name}: tokens differed between repeats (first kept)" for name in sorted(unstable)]
    return seconds, outputs


def _rows(
    transcriber: Transcriber,
    runners: dict[str, Runner],
    kept: list[int],
    refs: list[str],
    outputs: dict[str, dict[int, Output]],
    seconds: dict[str, list[float]],
    encoder_seconds: float,
    audio_seconds: float,
) -> list[dict[str, Any]]:
    greedy = [outputs["greedy"][i].tokens for i in kept]
    reference = statistics.median(seconds["greedy"])
    n = len(kept)
    rows = []
    for name, runner in runners.items():
        outs = [outputs[name][i] for i in kept]
        hyps = [transcriber.tokenizer.decode(list(o.tokens)) for o in outs]
        calls = sum(o.calls for o in outs)
        tokens = sum(len(o.tokens) for o in outs)
        dec = statistics.median(seconds[name])
        same = sum(o.tokens == g for o, g in zip(outs, greedy, strict=True))
        rows.append({
            "method": name, "wer": evaluate_results(refs, hyps)["wer"],
            "calls_per_utt": calls / n, "tokens_per_call": tokens / calls if calls else 0.0,
            "decoder_seconds": dec, "speedup": reference / dec if dec else 0.0,
            "rtf": (encoder_seconds + dec) / audio_seconds, "encoder_seconds": encoder_seconds,
            "encoder_rtf": encoder_seconds / audio_seconds, "decoder_rtf": dec / audio_seconds,
            "identical_to_greedy": same / n, "batch_size": runner.batch_size, "utterances": n,
            "decoder_calls": calls, "tokens": tokens, "audio_seconds": audio_seconds,
            "decoder_seconds_runs": seconds[name],
        })  # fmt: skip
    return rows


# --- output -----------------------------------------------------------------------------------


def format_table(report: BenchReport) -> str:
    """The header (machine, threads, versions), one line per method, then the notes."""
    h = report.header
    w = max([20, *(len(r["method"]) for r in report.rows)])
    lines = [
        f"torch {h['torch']}"
        + (f", transformers {h['transformers']}" if h.get("transformers") else "")
        + f" | {h['threads']} threads ({h['interop_threads']} interop) | {h['cpu']}"
        + f" | device {h['device']}",
        f"{h['utterances']} utterances, {h['audio_seconds']:.1f} s of audio | batch size "
        f"{h['batch_size']} | K = {h['heads']} heads | decoder {h.get('precision', 'float32')} "
        f"| times: median of {h['repeats']} "
        "repeat(s) after a warm-up",
        f"encoder (features + encoder + adapter, {h.get('encoder_precision', 'float32')}) "
        f"{h['encoder_seconds']:.3f} s, RTF {h['encoder_seconds'] / h['audio_seconds']:.4f}; "
        "its embeddings are shared by all",
        "",
        f"{'method':<{w}} {'WER':>7} {'calls/utt':>9} {'tok/call':>8} {'decoder s':>9} "
        f"{'speed-up':>8} {'RTF':>7} {'=greedy':>7} {'batch':>5}",
    ]
    for r in report.rows:
        lines.append(
            f"{r['method']:<{w}} {100 * r['wer']:6.2f}% {r['calls_per_utt']:9.2f} "
            f"{r['tokens_per_call']:8.2f} {r['decoder_seconds']:9.3f} {r['speedup']:7.2f}x "
            f"{r['rtf']:7.4f} {100 * r['identical_to_greedy']:6.0f}% {r['batch_size']:5d}"
        )
    lines += [
        "",
        "speed-up = greedy decoder seconds / method decoder seconds (same run)",
        "RTF = (encoder + decoder seconds) / audio seconds; =greedy: share of utterances whose "
        "tokens equal greedy's",
    ]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def write_json(report: BenchReport, path: str | os.PathLike) -> None:
    """The rows as a JSON list (one object per method)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(list(report.rows), f, indent=2)
        f.write("\n")


def plot_wer_vs_calls(report: BenchReport, path: str | os.PathLike) -> None:
    """WER (%) against decoder calls per utterance, one point per method and a legend beside
    the axes (methods at the same point share one entry, so none hides another). PNG through
    matplotlib's Agg canvas: no display, no global pyplot state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise OSError(f"{path}: plotting needs matplotlib (pip install matplotlib)") from err
    points: dict[tuple[float, float], list[str]] = {}
    for r in report.rows:
        xy = (round(r["calls_per_utt"], 6), round(100 * r["wer"], 6))
        points.setdefault(xy, []).append(r["method"])
    fig = Figure(figsize=(8.0, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (x, y), names in points.items():
        marker = "s" if all(n.startswith("hf-") for n in names) else "o"
        ax.scatter([x], [y], marker=marker, s=40, label=textwrap.fill(", ".join(names), 32))
    h = report.header
    ax.set_xlabel("decoder calls per utterance")
    ax.set_ylabel("WER (%)")
    ax.set_title(f"{h['utterances']} utterances, batch {h['batch_size']}, {h['threads']} threads",
                 fontsize=10)  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)
