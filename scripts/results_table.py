"""Render the README's results tables from `speechllama bench --json` and `scripts/peers.py
--json` outputs, so the published figures are pasted from measurements, never typed.

Usage:
  python scripts/results_table.py --bench synth-heldout=B/synth-heldout.json \
      --bench real-smoke=B/real-smoke.json --bench fsdd-test=B/fsdd-test.json \
      --peers B/peers.json --peers B/peers-digits.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def bench_rows(name: str, rows: list[dict[str, Any]]) -> list[str]:
    """One markdown row per method of one bench run (one set)."""
    first = rows[0]
    head = f"{name} ({first['utterances']} utts, {first['audio_seconds']:.0f} s)"
    out = []
    for i, r in enumerate(rows):
        out.append(
            f"| {head if i == 0 else ''} | {r['method']} | {100 * r['wer']:.2f}% "
            f"| {r['calls_per_utt']:.2f} | {r['tokens_per_call']:.2f} | {r['speedup']:.2f}x "
            f"| {r['encoder_rtf']:.4f} | {r['decoder_rtf']:.4f} | {r['rtf']:.4f} "
            f"| {100 * r['identical_to_greedy']:.0f}% |"
        )
    return out


def bench_table(benches: list[tuple[str, Path]]) -> str:
    lines = [
        "| set | method | WER | calls/utt | tok/call | decoder speed-up | RTF enc | RTF dec "
        "| RTF | =greedy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, path in benches:
        lines += bench_rows(name, json.loads(path.read_text()))
    return "\n".join(lines)


def peers_table(paths: list[Path]) -> str:
    lines = ["| system | set | utts | WER | RTF | threads |", "|---|---|---|---|---|---|"]
    for path in paths:
        for r in json.loads(path.read_text())["rows"]:
            lines.append(
                f"| {r['system']} | {r['set']} | {r['utterances']} | {100 * r['wer']:.2f}% "
                f"| {r['rtf']:.4f} | {r['threads']} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", action="append", default=[], metavar="NAME=JSON")
    p.add_argument("--peers", action="append", default=[], type=Path, metavar="JSON")
    args = p.parse_args()
    benches = [(b.split("=", 1)[0], Path(b.split("=", 1)[1])) for b in args.bench]
    if benches:
        print(bench_table(benches), end="\n\n")
    if args.peers:
        print(peers_table(args.peers))


if __name__ == "__main__":
    main()
