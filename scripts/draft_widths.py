"""How wide verification's calls are with confidence-gated drafting, per draft threshold.

    .venv/bin/python scripts/draft_widths.py data/synthetic/real-smoke/manifest.jsonl
    .venv/bin/python scripts/draft_widths.py MANIFEST --model DIR --thresholds 0,0.1,0.3

Prints one JSON line per threshold: decoder calls per utterance, tokens per call, tokens fed
per decoder step, the histogram of call widths, and how many transcripts equal greedy's. Counts
only, batch 1, one thread: how much time the narrower calls save is `speechllama bench`'s job
(``verify-exact@P``). Why: a call's width, not only the number of calls, sets verification's
cost on a CPU (docs/speed.md).
"""

from __future__ import annotations

import argparse
import json

import torch

from speechllama.data.manifest import load_manifest
from speechllama.decoding import DecodingOptions
from speechllama.transcribe import load_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("manifest")
    p.add_argument("--model", default=None, help="checkpoint directory (default: bundled)")
    p.add_argument("--thresholds", default="0,0.05,0.1,0.2,0.3,0.5")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tr = load_model(args.model, encoder_precision="float32")
    paths = [u.audio_filepath for u in load_manifest(args.manifest)]
    widths: list[int] = []
    step = tr.model.step

    def counted(tokens: torch.Tensor, *rest: object, **kw: object) -> torch.Tensor:
        widths.append(tokens.shape[1])
        return step(tokens, *rest, **kw)

    tr.model.step = counted  # type: ignore[method-assign]
    greedy = [r.tokens for r in tr.transcribe(paths, DecodingOptions(batch_size=1))]
    for t in (float(x) for x in args.thresholds.split(",")):
        widths.clear()
        opts = DecodingOptions(strategy="verify", batch_size=1, draft_threshold=t)
        res = tr.transcribe(paths, opts)
        calls = sum(r.decoder_calls for r in res)
        row = {
            "threshold": t,
            "calls_per_utt": round(calls / len(res), 2),
            "tok_per_call": round(sum(len(r.tokens) for r in res) / calls, 3),
            "fed_per_step": round(sum(widths) / max(1, len(widths)), 3),
            "width_hist": {w: widths.count(w) for w in sorted(set(widths))},
            "same_as_greedy": sum(r.tokens == g for r, g in zip(res, greedy, strict=True)),
            "utterances": len(res),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
