"""Word error rate, alignments and cost of a model on a manifest.

WER is always computed with jiwer on text passed through the project's one normaliser
(``speechllama.text.normalize``), as the word-level Levenshtein distance
(S + D + I) / N with N the number of reference words. Utterances whose audio failed to load are
not scored (they would otherwise count as all-deletions); they are counted in ``failed`` and
listed in the hypotheses file with their error, and the CLI exits non-zero if there are any.

Output directory layout (``evaluate_manifest(..., out_dir=DIR)``):

- ``hypotheses.jsonl``: one object per utterance, appended and synced as each one finishes
  (``speechllama.resultlog``), so a killed run loses at most the batch in flight; a re-run
  into the same DIR with the same model and options (``run.json``) skips the utterances
  already there. At the end the file is rewritten in manifest order, one row each;
- ``alignments.txt``: per-utterance REF/HYP alignments (jiwer) in manifest order, then the most
  frequent substitutions, insertions and deletions;
- ``summary.json``: WER, error counts, decoder calls, tokens, timing and real-time factors,
  and ``head_accuracy``: each head's teacher-forced top-1 accuracy on the reference transcripts
  (``speechllama.head_accuracy``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jiwer

from speechllama.decoding import DecodingOptions, DecodingResult
from speechllama.head_accuracy import teacher_forced_accuracy
from speechllama.inputs import Clip
from speechllama.resultlog import ResultLog, read_rows, replace_rows, write_text_atomic
from speechllama.text import normalize

if TYPE_CHECKING:
    from speechllama.data.manifest import Utterance
    from speechllama.transcribe import Transcriber


def _counts(output: Any) -> dict[str, int]:
    s, d, i, h = output.substitutions, output.deletions, output.insertions, output.hits
    return {"substitutions": s, "deletions": d, "insertions": i, "hits": h, "words": s + d + h}


def _wer(counts: dict[str, int]) -> float:
    """(S + D + I) / N; with no reference words, the insertions count against one word."""
    errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    return errors / max(counts["words"], 1)


def evaluate_results(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, Any]:
    """Score hypotheses against references (raw text; both are normalised here).

    Returns ``wer`` (a fraction), ``substitutions``, ``deletions``, ``insertions``, ``hits``,
    ``words`` (reference words) and ``utterances``."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        counts = {"substitutions": 0, "deletions": 0, "insertions": 0, "hits": 0, "words": 0}
    else:
        output = jiwer.process_words([normalize(r) for r in refs], [normalize(h) for h in hyps])
        counts = _counts(output)
    return {"wer": _wer(counts), **counts, "utterances": len(refs)}


def alignment_text(names: Sequence[str], refs: Sequence[str], hyps: Sequence[str]) -> str:
    """Human-readable alignments of normalised ``refs`` and ``hyps``, one block per utterance
    headed by its name and error counts, then the aggregate error counts."""
    blocks = []
    for name, ref, hyp in zip(names, refs, hyps, strict=True):
        output = jiwer.process_words(ref, hyp)
        c = _counts(output)
        shown = jiwer.visualize_alignment(output, show_measures=False, skip_correct=False)
        body = shown.split("\n", 2)[2] if shown.startswith("===") else shown  # drop its header
        head = f"{name}  S={c['substitutions']} D={c['deletions']} I={c['insertions']}"
        blocks.append(f"=== {head} N={c['words']} ===\n{body.rstrip()}\n")
    if refs:
        blocks.append(jiwer.visualize_error_counts(jiwer.process_words(list(refs), list(hyps))))
    return "\n".join(blocks)


def summarize(
    refs: Sequence[str], results: Sequence[DecodingResult], strategy: str | None = None
) -> dict[str, Any]:
    """WER and cost over ``results`` (aligned with ``refs``); failed results are not scored."""
    ok = [(ref, r) for ref, r in zip(refs, results, strict=True) if r.error is None]
    summary = evaluate_results([ref for ref, _ in ok], [r.text for _, r in ok])
    calls = sum(r.decoder_calls for _, r in ok)
    tokens = sum(len(r.tokens) for _, r in ok)
    enc = sum(r.encoder_seconds for _, r in ok)
    dec = sum(r.decoder_seconds for _, r in ok)
    audio = sum(r.audio_seconds for _, r in ok)
    histogram: list[int] = []
    for _, r in ok:
        for i, n in enumerate(r.accepted_per_call):
            histogram.extend([0] * (i + 1 - len(histogram)))
            histogram[i] += n
    summary.update(
        failed=len(results) - len(ok),
        strategy=strategy,
        decoder_calls=calls,
        tokens=tokens,
        tokens_per_call=tokens / calls if calls else 0.0,
        calls_per_utt=calls / len(ok) if ok else 0.0,
        accepted_per_call=histogram,
        encoder_seconds=enc,
        decoder_seconds=dec,
        audio_seconds=audio,
        rtf=(enc + dec) / audio if audio else 0.0,
        encoder_rtf=enc / audio if audio else 0.0,
        decoder_rtf=dec / audio if audio else 0.0,
    )
    return summary


def _record(utt: Utterance, result: DecodingResult) -> dict[str, Any]:
    ref = utt.text
    row: dict[str, Any] = {"key": utt.key, "audio_filepath": utt.audio_filepath, "reference": ref}
    if utt.offset:
        row["offset"] = utt.offset
    if result.error is not None:
        row["error"] = result.error
        return row
    ref_n, hyp_n = normalize(ref), normalize(result.text)
    counts = _counts(jiwer.process_words(ref_n, hyp_n))
    row.update(
        hypothesis=result.text,
        reference_normalized=ref_n,
        hypothesis_normalized=hyp_n,
        **{k: counts[k] for k in ("substitutions", "deletions", "insertions", "words")},
        decoder_calls=result.decoder_calls,
        tokens=len(result.tokens),
        token_ids=list(result.tokens),
        accepted_per_call=list(result.accepted_per_call),
        encoder_seconds=round(result.encoder_seconds, 6),
        decoder_seconds=round(result.decoder_seconds, 6),
        audio_seconds=round(result.audio_seconds, 6),
    )
    return row


def _result(row: dict[str, Any], utt: Utterance) -> DecodingResult | None:
    """The result a hypotheses.jsonl row recorded for ``utt``, or None when the row is not a
    finished result for exactly this utterance and reference (then it is done again)."""
    if row.get("key") != utt.key or row.get("reference") != utt.text or "error" in row:
        return None
    try:
        return DecodingResult(
            text=str(row["hypothesis"]),
            tokens=tuple(int(t) for t in row["token_ids"]),
            decoder_calls=int(row["decoder_calls"]),
            accepted_per_call=tuple(int(n) for n in row["accepted_per_call"]),
            encoder_seconds=float(row["encoder_seconds"]),
            decoder_seconds=float(row["decoder_seconds"]),
            audio_seconds=float(row["audio_seconds"]),
            audio_filepath=utt.audio_filepath,
        )
    except (KeyError, TypeError, ValueError):
        return None


def _source(utt: Utterance) -> str | Clip:
    """What to transcribe for ``utt``: its file, or for a segment of a longer file (``offset``,
    as in NeMo/Lhotse manifests) that span of it (decoded only when its batch comes)."""
    if not utt.offset:
        return utt.audio_filepath
    return Clip(utt.audio_filepath, utt.offset, utt.duration)


def evaluate_manifest(
    model: Transcriber,
    manifest: str | os.PathLike | Iterable[Utterance],
    options: DecodingOptions | None = None,
    out_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    on_result: Callable[[int, DecodingResult], None] | None = None,
    head_accuracy: bool = True,
) -> dict[str, Any]:
    """Transcribe every utterance of ``manifest`` (a NeMo JSONL path or ``Utterance`` objects)
    with ``model`` and score it. Returns the summary (see ``summarize``); with ``out_dir`` also
    writes hypotheses.jsonl (as results arrive), alignments.txt and summary.json there, and
    resumes a killed run of the same evaluation there (see ``_resume``).
    ``head_accuracy``: add the teacher-forced per-head accuracy of the utterances that decoded
    (see ``teacher_forced_accuracy``; it costs one more encoder and decoder pass, untimed).

    The training loop uses this for dev WER: ``evaluate_manifest(Transcriber(model, tok), dev)``.
    ``on_result(index, result)`` is called as each utterance finishes (the CLI prints errors).
    """
    from speechllama.data.manifest import load_manifest

    options = options or DecodingOptions()
    if isinstance(manifest, (str, os.PathLike)):
        # Audio problems are per-utterance failures (counted, reported), not a reason to refuse
        # the whole manifest; malformed rows still are.
        utts = load_manifest(manifest, check_audio=False)
    else:
        utts = list(manifest)
    if limit is not None:
        utts = utts[: max(0, limit)]
    refs = [u.text for u in utts]
    results: list[DecodingResult | None] = [None] * len(utts)
    out = Path(out_dir) if out_dir is not None else None
    log = None
    resumed = 0
    if out is not None:
        for index, result in _resume(out, utts, options, model).items():
            resumed += 1
            results[index] = result
            if on_result is not None:
                on_result(index, result)
        log = ResultLog(out / HYPOTHESES)
        log.open()
    sources = [_source(u) for u in utts]
    todo = [i for i, r in enumerate(results) if r is None]
    try:
        for j, result in model.transcribe_iter([sources[i] for i in todo], options):
            index = todo[j]
            result = dataclasses.replace(result, audio_filepath=utts[index].audio_filepath)
            results[index] = result
            if on_result is not None:
                on_result(index, result)
            if log is not None:
                log.append(_record(utts[index], result))
    finally:
        if log is not None:
            log.close()
    done = [r for r in results if r is not None]
    summary = summarize(refs, done, strategy=options.strategy)
    summary["options"] = json.loads(json.dumps(dataclasses.asdict(options)))  # tuples -> lists
    if resumed:
        summary["resumed"] = resumed  # utterances an interrupted run had finished
    if head_accuracy:
        decoded = [(u, src) for u, src, r in zip(utts, sources, done, strict=True) if not r.error]
        summary.update(
            teacher_forced_accuracy(model, decoded, options.batch_size, fp16=options.fp16)
        )
    if out is not None:  # the journal becomes the tidy file: manifest order, one row each
        write_report(out, utts, done, summary, hypotheses=True)
    return summary


HYPOTHESES = "hypotheses.jsonl"
RUN_FILE = "run.json"


def _resume(
    out: Path, utts: Sequence[Utterance], options: DecodingOptions, model: Transcriber
) -> dict[int, DecodingResult]:
    """Results a killed earlier run of the same evaluation left in ``out`` (index -> result).

    Same evaluation: ``run.json`` records the decoding options and the model's checkpoint
    config (its weights' provenance); when either differs, or the model has no config (one being
    trained), ``out`` starts afresh. Rows are matched by utterance key and reference, so rows
    of utterances no longer in the manifest are dropped; failed utterances are retried."""
    run = {
        "options": json.loads(json.dumps(dataclasses.asdict(options))),
        "model": json.loads(json.dumps(model.meta, sort_keys=True, default=str)),
    }
    out.mkdir(parents=True, exist_ok=True)
    same = False
    if model.meta and (out / RUN_FILE).is_file():
        try:
            same = json.loads((out / RUN_FILE).read_text(encoding="utf-8")) == run
        except (OSError, ValueError):
            same = False
    if not same:
        write_text_atomic(out / RUN_FILE, json.dumps(run, indent=1) + "\n")
        replace_rows(out / HYPOTHESES, [])
        return {}
    rows, _ = read_rows(out / HYPOTHESES)
    by_key = {row.get("key"): row for row in rows}  # a later row for a key wins
    found = {}
    for index, utt in enumerate(utts):
        row = by_key.get(utt.key)
        result = _result(row, utt) if row is not None else None
        if result is not None:
            found[index] = result
    return found


def write_report(
    out: Path,
    utts: Sequence[Utterance],
    results: Sequence[DecodingResult],
    summary: dict[str, Any],
    hypotheses: bool = False,
) -> None:
    """alignments.txt (the utterances that decoded, in ``utts`` order) and summary.json in
    ``out``; with ``hypotheses`` also hypotheses.jsonl, all rows at once (what rank 0 of a
    sharded evaluation writes after merging the ranks' results, ``distributed_eval``)."""
    if hypotheses:
        replace_rows(out / HYPOTHESES, [_record(u, r) for u, r in zip(utts, results, strict=True)])
    ok = [(u, r) for u, r in zip(utts, results, strict=True) if r.error is None]
    text = alignment_text(
        [str(u.audio_filepath) for u, _ in ok],
        [normalize(u.text) for u, _ in ok],
        [normalize(r.text) for _, r in ok],
    )
    write_text_atomic(out / "alignments.txt", text)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
