"""Sharded ``evaluate`` and ``transcribe`` under ``torchrun``: one share of the work per rank.

Rank r of W takes the items at positions i with ``i % W == r`` (of the manifest, or of the
de-duplicated file list): a pure function of the input and the world size, so every rank knows
every share without talking to the others, and a restarted job deals the same shares again.

- ``evaluate``: each rank evaluates its share into ``OUT/shards/rank-R-of-W/`` (the usual files,
  hypotheses written as they finish), then the ranks' results (``DecodingResult`` objects, a
  gather over gloo, so no shared filesystem is needed) are merged on rank 0 into manifest order,
  and rank 0 alone scores them, once, over all utterances (WER, costs, head accuracy) and
  writes ``OUT/hypotheses.jsonl``, ``alignments.txt`` and ``summary.json``: the files a
  one-process run writes, up to the order of hypotheses.jsonl rows and the timings.
- ``transcribe --output OUT.jsonl``: each rank appends its rows to ``OUT.jsonl.rank-R-of-W`` (and
  skips files already there or in OUT.jsonl, so an interrupted job resumes), then rank 0 adds
  the parts' rows to OUT.jsonl in rank order (one atomic rewrite, no file twice) and deletes
  the parts.

The group is always gloo: what the ranks exchange is a few Python objects, whatever device the
model runs on (``rank_device`` gives each rank its own GPU, ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from speechllama.train.distributed import barrier, launched_world_size, session

if TYPE_CHECKING:
    from speechllama.data.manifest import Utterance
    from speechllama.decoding import DecodingResult
    from speechllama.transcribe import Transcriber


def rank_device(device: str) -> str:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun (one GPU per rank); anything else as is."""
    if device == "cuda" and launched_world_size() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def share(count: int, rank: int, world_size: int) -> list[int]:
    """The positions ``i < count`` with ``i % world_size == rank``: rank's share of a list."""
    return list(range(rank, count, world_size))


def evaluate_sharded(
    model: Transcriber, manifest: str | os.PathLike | Iterable[Utterance], **kwargs: Any
) -> dict[str, Any] | None:
    """``evaluate_manifest(model, manifest, **kwargs)`` with the utterances shared among
    torchrun's ranks (see the module docstring); outside torchrun exactly that call. Returns
    the merged summary on rank 0 and None on the other ranks; ``on_result`` gets manifest
    indices."""
    from speechllama.data.manifest import load_manifest
    from speechllama.evaluate import evaluate_manifest, summarize, write_report

    if launched_world_size() <= 1:
        return evaluate_manifest(model, manifest, **kwargs)
    out_dir, limit = kwargs.pop("out_dir", None), kwargs.pop("limit", None)
    on_result = kwargs.pop("on_result", None)
    if isinstance(manifest, (str, os.PathLike)):
        utts = load_manifest(manifest, check_audio=False)
    else:
        utts = list(manifest)
    utts = utts[: max(0, limit)] if limit is not None else utts
    with session(backend="gloo") as ctx:
        mine = share(len(utts), ctx.rank, ctx.world_size)
        results: dict[int, DecodingResult] = {}

        def keep(index: int, result: DecodingResult) -> None:
            results[mine[index]] = result
            if on_result is not None:
                on_result(mine[index], result)

        part_dir = None
        if out_dir is not None:
            part_dir = Path(out_dir) / "shards" / f"rank-{ctx.rank}-of-{ctx.world_size}"
        part = evaluate_manifest(
            model, [utts[i] for i in mine], out_dir=part_dir, on_result=keep, **kwargs
        )
        parts: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
        dist.gather_object((results, part), parts, dst=0)
        barrier(ctx)
    if parts is None:
        return None
    merged: dict[int, DecodingResult] = {}
    for rank_results, _ in parts:
        merged.update(rank_results)
    ordered = [merged[i] for i in range(len(utts))]
    summary = summarize([u.text for u in utts], ordered, strategy=parts[0][1]["strategy"])
    summary["options"] = parts[0][1]["options"]
    resumed = sum(p.get("resumed", 0) for _, p in parts)
    if resumed:
        summary["resumed"] = resumed  # found done in the ranks' shards by a re-run
    if "head_accuracy" in parts[0][1]:
        summary.update(merge_head_accuracy([p for _, p in parts]))
    if out_dir is not None:
        write_report(Path(out_dir), utts, ordered, summary, hypotheses=True)
    return summary


def merge_head_accuracy(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' teacher-forced head accuracies as one: hits are recovered exactly from each
    rank's fraction x positions (integers), then divided by all positions, as one process
    would have counted them; cross-entropies are pooled the same way, weighted by positions."""
    tokens = [sum(t) for t in zip(*(p["head_accuracy_tokens"] for p in parts), strict=True)]
    hits = [
        sum(round(a * n) for a, n in zip(accs, counts, strict=True))
        for accs, counts in zip(
            zip(*(p["head_accuracy"] for p in parts), strict=True),
            zip(*(p["head_accuracy_tokens"] for p in parts), strict=True),
            strict=True,
        )
    ]
    ce = [
        sum(c * n for c, n in zip(ces, counts, strict=True))
        for ces, counts in zip(
            zip(*(p["head_ce"] for p in parts), strict=True),
            zip(*(p["head_accuracy_tokens"] for p in parts), strict=True),
            strict=True,
        )
    ]
    return {
        "head_accuracy": [h / max(n, 1) for h, n in zip(hits, tokens, strict=True)],
        "head_accuracy_tokens": tokens,
        "head_ce": [c / max(n, 1) for c, n in zip(ce, tokens, strict=True)],
        "head_accuracy_skipped": [s for p in parts for s in p["head_accuracy_skipped"]],
    }


def part_path(output: Path, rank: int, world_size: int) -> Path:
    return output.with_name(f"{output.name}.rank-{rank}-of-{world_size}")


def transcribe_sharded(
    args: argparse.Namespace,
    run_files: Callable[[argparse.Namespace], int],
    finished: Callable[[Path], tuple[set[str], bool]],
) -> int:
    """Run the ``transcribe`` command ``run_files`` on this rank's share of ``args.files``.

    ``finished(path)``: the (absolute) files already transcribed into a JSONL output, as the
    command's own resume check reads them; files already in ``args.output`` are left out, the
    rest of the share goes to ``run_files`` with this rank's part file as its output (which
    skips what the part holds), and rank 0 appends the parts to ``args.output`` at the end.
    Outside torchrun: ``run_files(args)``."""
    if launched_world_size() <= 1:
        return run_files(args)
    with session(backend="gloo") as ctx:
        files = list(dict.fromkeys(args.files))
        mine = [files[i] for i in share(len(files), ctx.rank, ctx.world_size)]
        output: Path | None = args.output
        part = None
        if output is not None:
            done, _ = finished(output)
            mine = [f for f in mine if os.path.abspath(f) not in done]
            part = part_path(output, ctx.rank, ctx.world_size)
        device = rank_device(args.device)
        code = run_files(
            argparse.Namespace(**{**vars(args), "files": mine, "output": part, "device": device})
        )
        barrier(ctx)  # every part is complete
        if output is not None and ctx.is_main:
            parts = [part_path(output, r, ctx.world_size) for r in range(ctx.world_size)]
            _append_parts(output, parts)
        barrier(ctx)
    return code


def _append_parts(output: Path, parts: list[Path]) -> None:
    """Add the parts' rows (complete lines only: a torn tail's file was not finished) to
    ``output`` in one atomic rewrite, leaving out files already there, so a merge cut short and
    run again adds nothing twice; then delete the parts."""
    from speechllama.resultlog import read_rows, replace_rows

    rows, _ = read_rows(output)
    seen = {_file_key(r) for r in rows}
    for part in parts:
        for row in read_rows(part)[0]:
            if _file_key(row) not in seen:
                seen.add(_file_key(row))
                rows.append(row)
    replace_rows(output, rows)
    for part in parts:
        part.unlink(missing_ok=True)


def _file_key(row: dict[str, Any]) -> str | None:
    name = row.get("audio_filepath")
    return os.path.abspath(name) if isinstance(name, str) else None
