"""``speechllama info MODEL_DIR``: a checkpoint's configuration and parameter counts per part
(encoder, adapter, decoder, heads, ...), trainable vs frozen, and what each kind of multi-token
heads would add to its decoder (to choose a kind before training one). ``--model smollm``
shows the preset built on the pretrained SmolLM2 decoder."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from speechllama.model.config import ModelConfig

# The report covers at least this many heads, so a next-token model shows what K = 4 would cost.
REPORT_MIN_HEADS = 4


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's configuration and size", description=__doc__)
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="checkpoint directory")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="same as MODEL_DIR (default: the bundled 'default' model); or a preset "
                        "built from installed packages: smollm")  # fmt: skip
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


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells -> aligned text: the first column left-aligned, the others right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [row[i].rjust(widths[i]) for i in range(1, len(row))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_counts(parts: dict[str, Any]) -> str:
    rows = [("part", "trainable", "frozen", "total")]
    total_t = total_f = 0
    for name, c in parts.items():
        t, f = int(c.get("trainable", 0)), int(c.get("frozen", 0))
        total_t, total_f = total_t + t, total_f + f
        rows.append((name, f"{t:,}", f"{f:,}", f"{t + f:,}"))
    rows.append(("total", f"{total_t:,}", f"{total_f:,}", f"{total_t + total_f:,}"))
    return format_table(rows)


def heads_report(config: ModelConfig, model_total: int) -> tuple[int, str]:
    """(K, table): the parameters each registered head kind would add to ``config``'s decoder
    with K = max(the model's K, ``REPORT_MIN_HEADS``) heads, over the next-token output layer,
    and that as a share of ``model_total`` (the model's own parameter count). The model's own
    kind is marked. Built on the meta device, so free whatever the vocabulary."""
    from speechllama.model.heads import heads_parameter_report

    k = max(config.heads.num_heads, REPORT_MIN_HEADS)
    rows = [("kind", "adds", "of model")]
    for kind, added in heads_parameter_report(config, num_heads=k).items():
        name = f"{kind} (this model)" if kind == config.heads.kind else kind
        share = f"{100 * added / model_total:.1f}%" if model_total else "-"
        rows.append((name, f"{added:,}", share))
    return k, format_table(rows)


def run(args: argparse.Namespace) -> int:
    from speechllama.transcribe import load_model, resolve_model_dir

    if args.model_dir and args.model and args.model_dir != args.model:
        raise ValueError("give the model either as MODEL_DIR or with --model, not both")
    name = args.model_dir or args.model
    loaded = load_model(name, merge_lora=False)  # LoRA factors counted as their own part
    preset = loaded.meta.get("preset")
    if preset:  # built by name: no checkpoint directory behind it
        print(f"model: preset {preset} (pretrained parts from installed packages; "
              "adapter and heads freshly initialised, untrained)")  # fmt: skip
    else:
        print(f"model: {resolve_model_dir(name)}")
    print(f"tokenizer: vocabulary of {loaded.tokenizer.vocab_size}")
    training = loaded.meta.get("training")
    if training:
        print("training: " + json.dumps(training, sort_keys=True, default=str))
    # Before the config: the parameters table runs to the end of the output (scripts read it).
    counts = parameter_counts(loaded.model)
    total = sum(int(c.get("trainable", 0)) + int(c.get("frozen", 0)) for c in counts.values())
    k, table = heads_report(loaded.config, total)
    own = loaded.config.heads
    print(f"heads: {own.kind}, K = {own.num_heads}; what each kind adds over the next-token "
          f"output layer at K = {k}:")  # fmt: skip
    print(table)
    print("config:")
    print(json.dumps(loaded.config.to_dict(), indent=2))
    print("parameters:")
    print(format_counts(counts))
    return 0
