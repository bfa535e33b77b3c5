"""``speechllama info MODEL_DIR``: a checkpoint's configuration and parameter counts per part
(encoder, adapter, decoder, heads, ...), trainable vs frozen."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's configuration and size", description=__doc__)
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="checkpoint directory")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="same as MODEL_DIR (default: the bundled 'default' model)")  # fmt: skip
    p.set_defaults(func=run)


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{part: {"trainable": n, "frozen": n}}`` by top-level submodule.

    Uses the model's own ``num_parameters()`` breakdown when it has one. Tied weights (e.g. an
    output layer sharing the embedding) are counted once, under the part that registers them
    first, because ``named_parameters`` deduplicates."""
    own = getattr(model, "num_parameters", None)
    if callable(own):
        counts = own()
        if isinstance(counts, dict):
            return counts
    parts: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        part = parts.setdefault(name.split(".", 1)[0], {"trainable": 0, "frozen": 0})
        part["trainable" if param.requires_grad else "frozen"] += param.numel()
    return parts


def format_counts(parts: dict[str, Any]) -> str:
    rows = [("part", "trainable", "frozen", "total")]
    total_t = total_f = 0
    for name, c in parts.items():
        t, f = int(c.get("trainable", 0)), int(c.get("frozen", 0))
        total_t, total_f = total_t + t, total_f + f
        rows.append((name, f"{t:,}", f"{f:,}", f"{t + f:,}"))
    rows.append(("total", f"{total_t:,}", f"{total_f:,}", f"{total_t + total_f:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [row[i].rjust(widths[i]) for i in range(1, len(row))]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from speechllama.transcribe import load_model, resolve_model_dir

    if args.model_dir and args.model and args.model_dir != args.model:
        raise ValueError("give the model either as MODEL_DIR or with --model, not both")
    name = args.model_dir or args.model
    path = resolve_model_dir(name)
    loaded = load_model(path)
    print(f"model: {path}")
    print(f"tokenizer: vocabulary of {loaded.tokenizer.vocab_size}")
    training = loaded.meta.get("training")
    if training:
        print("training: " + json.dumps(training, sort_keys=True, default=str))
    print("config:")
    print(json.dumps(loaded.config.to_dict(), indent=2))
    print("parameters:")
    print(format_counts(parameter_counts(loaded.model)))
    return 0
