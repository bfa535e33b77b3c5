"""scripts/results_table.py renders bench and peers JSON into the README's markdown rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location(
        "results_table", ROOT / "scripts/results_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_and_peers_rows(tmp_path: Path) -> None:
    row = {
        "method": "verify-exact", "wer": 0.5187, "calls_per_utt": 16.466, "tokens_per_call": 1.13,
        "speedup": 1.012, "encoder_rtf": 0.0109, "decoder_rtf": 0.0382, "rtf": 0.0491,
        "identical_to_greedy": 1.0, "utterances": 150, "audio_seconds": 531.1,
    }  # fmt: skip
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps([row, {**row, "method": "greedy", "speedup": 1.0}]))
    table = _module().bench_table([("synth-heldout", bench)]).splitlines()
    assert table[2] == (
        "| synth-heldout (150 utts, 531 s) | verify-exact | 51.87% | 16.47 | 1.13 | 1.01x "
        "| 0.0109 | 0.0382 | 0.0491 | 100% |"
    )
    assert table[3].startswith("|  | greedy | 51.87% |") and len(table) == 4
    peers = tmp_path / "p.json"
    rows = [{"system": "pocketsphinx en-us", "set": "fsdd-test", "utterances": 300, "wer": 0.85,
             "rtf": 0.7034, "threads": 1}]  # fmt: skip
    peers.write_text(json.dumps({"header": {}, "rows": rows}))
    assert _module().peers_table([peers]).splitlines()[2] == (
        "| pocketsphinx en-us | fsdd-test | 300 | 85.00% | 0.7034 | 1 |"
    )
