"""Linear layers of cached decoding on CPU, through oneDNN's packed weights where that is faster.

Why: a decoder call multiplies only B·k rows (1..20 at batch 1..4, k = 1..5) by every weight
matrix, and which kernel is fastest for so few rows depends on the CPU, the thread count and
OpenMP's wait policy, not on the model alone. MKL's sgemm, which ``F.linear`` uses, is a fast
gemv for one row; oneDNN's blocked ("packed") layout, with q|k|v and gate|up concatenated
(4 matmuls a layer instead of 7), keeps a call over several rows nearly as cheap as one. Measured
with the ``small`` decoder's matrices, 2 threads:

- 2-core AMD EPYC (sessions 4-8): packing every row count made greedy 1.20x faster with
  spinning OpenMP threads, and 15% slower with sleeping ones;
- 2-core Intel Xeon (session 11): MKL 12-36 us against packed 26-52 us at one row, while
  packed won from 4 rows on the larger matrices; packing every call made greedy 1.5x slower.

So no fixed rule is right: :class:`PackPolicy` holds one measured choice per row-count bucket
(and dtype and thread count) for a whole model, which ``SpeechLLaMA`` fills the first time a
call of that size comes (``speechllama.model.pack_tuning``). ``SPEECHLLAMA_PACK=always`` or
``never`` overrides it (reproducible bits across machines, or a comparison).

Both paths compute ``F.linear`` but not bit for bit alike. The packed rows do not depend on how
many rows there are (checked bit for bit for 1..256 rows, fp32 and bf16, 1 and 2 threads).

The packed copies live beside the parameters (they double the decoder's weight memory) and are
rebuilt whenever a weight changes (its storage or its version counter: an optimizer step,
``load_state_dict``, ``.to()``). They are used only where no gradient can be needed; training
and anything else (another device, autocast, a dtype oneDNN does not pack) take ``F.linear``.

With ``int8`` set (``SpeechLLaMA.set_decoder_int8``) the same store holds int8 copies instead,
and every row count goes through :mod:`speechllama.model.int8`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from speechllama.model.int8 import int8_linear, quantize_weight
from speechllama.model.int8 import usable as int8_usable

_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_AVAILABLE = _REORDER is not None and _LINEAR is not None and torch.backends.mkldnn.is_available()
_DTYPES = (torch.float32, torch.bfloat16)
PACK_ENV = "SPEECHLLAMA_PACK"
PACK_MODES = ("auto", "always", "never")
# Calls over this many rows (prefills) are not measured and take MKL: from 64 rows on the two
# kernels were within 10% of each other for every matrix of `small` (2 threads, Intel Xeon,
# session 11), while timing a 256-row call both ways cost 0.6 s.
MEASURED_ROWS = 64


def packing_available() -> bool:
    """Whether this torch has oneDNN's packed linear (CPU builds with mkldnn)."""
    return _AVAILABLE


def row_bucket(rows: int) -> int:
    """The bucket whose measured choice a call of ``rows`` rows (B·k, at most
    ``MEASURED_ROWS``) follows: exact up to 16 (batch-1 steps), then 32 and 64."""
    return rows if rows <= 16 else 32 if rows <= 32 else 64


class PackPolicy:
    """Whether a decoder call of a given size runs on packed weights; one per model, shared by
    all its :class:`PackedLinears`.

    ``mode``: "auto" (the measured choice of :attr:`choices` up to ``MEASURED_ROWS`` rows, MKL
    beyond; an unmeasured size packs from two rows on), "always" or "never"; by default from
    ``SPEECHLLAMA_PACK``, else "auto".
    ``choices`` maps (dtype, threads, bucket) to the measured choice."""

    def __init__(self, mode: str | None = None) -> None:
        mode = (mode or os.environ.get(PACK_ENV) or "auto").lower()
        if mode not in PACK_MODES:
            raise ValueError(f"{PACK_ENV}={mode!r}: expected one of {', '.join(PACK_MODES)}")
        self.mode = mode
        self.choices: dict[tuple[torch.dtype, int, int], bool] = {}

    @staticmethod
    def key(rows: int, dtype: torch.dtype) -> tuple[torch.dtype, int, int]:
        return dtype, torch.get_num_threads(), row_bucket(rows)

    def measured(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether a call of ``rows`` rows needs no measurement (any more)."""
        return self.mode != "auto" or rows > MEASURED_ROWS or self.key(rows, dtype) in self.choices

    def packs(self, rows: int, dtype: torch.dtype) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        if rows > MEASURED_ROWS:
            return False
        return self.choices.get(self.key(rows, dtype), rows > 1)


def _version(w: torch.Tensor) -> int:
    try:
        return w._version
    except RuntimeError:  # an inference tensor has no version counter and cannot change
        return -1


class PackedLinears:
    """Per-module store of packed (and, for several matrices, concatenated) weights.

    ``linear(x, name, weights)`` = ``F.linear(x, cat(weights))`` (B, T, sum of out features):
    several matrices reading the same input (q|k|v, gate|up) become one matmul, on packed
    weights where ``policy`` says so. ``int8``: run those matmuls on int8 copies of the weights
    (an approximation, see ``model.int8``)."""

    def __init__(self, policy: PackPolicy | None = None) -> None:
        self._store: dict[str, tuple[tuple, Any]] = {}
        self.int8 = False
        self.policy = policy or PackPolicy()

    def _get(
        self, name: str, weights: tuple[torch.Tensor, ...], build: Callable[[torch.Tensor], Any]
    ) -> Any:
        """The stored copy of ``weights`` under ``name``, rebuilt with ``build(w)`` (w: the
        matrices concatenated) whenever a weight or the int8 setting changed."""
        key = (self.int8, *((w.data_ptr(), _version(w), w.dtype, w.shape) for w in weights))
        hit = self._store.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                w = weights[0] if len(weights) == 1 else torch.cat(weights)
                hit = (key, build(w.detach()))
            self._store[name] = hit
        return hit[1]

    def linear(self, x: torch.Tensor, name: str, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        w0 = weights[0]
        traced = torch.compiler.is_compiling()  # inductor picks its own kernels (compiled.py)
        if self.int8 and not traced and int8_usable(x, w0):
            w8, scale = self._get(name, weights, quantize_weight)
            return int8_linear(x, w8, scale)
        rows = x.numel() // x.shape[-1]
        if traced or not usable(x, w0):  # one matmul per matrix, bitwise the modules' own
            if len(weights) == 1:
                return F.linear(x, w0)
            return torch.cat([F.linear(x, w) for w in weights], dim=-1)
        if not self.policy.packs(rows, x.dtype):  # MKL, on the matrices concatenated once
            # x @ w.t() is what F.linear runs here, minus its own two dispatches (linear, t)
            w_t = self._get(name + ":mkl", weights, lambda w: w.t())
            return torch.matmul(x, w_t)
        packed = self._get(name, weights, lambda w: _REORDER(w, None))
        out = _LINEAR(x.reshape(-1, x.shape[-1]), packed, None, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    def clear(self) -> None:
        self._store.clear()

    def __deepcopy__(self, memo: dict) -> PackedLinears:
        # A copy's weights live elsewhere: it packs its own. The memo makes the stores of one
        # deep-copied model share one copy of their policy, as the original's do.
        copy = PackedLinears(_deepcopy_policy(self.policy, memo))
        copy.int8 = self.int8
        return copy

    def __getstate__(self) -> dict:
        return {"_store": {}, "int8": self.int8, "policy": self.policy}


def _deepcopy_policy(policy: PackPolicy, memo: dict) -> PackPolicy:
    hit = memo.get(id(policy))
    if hit is None:
        hit = memo[id(policy)] = PackPolicy(policy.mode)
        hit.choices = dict(policy.choices)
    return hit


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the packed path computes ``F.linear(x, weight)`` here: CPU, fp32 or bf16 on
    both sides, no autograd through the weight, no autocast."""
    return (
        _AVAILABLE
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in _DTYPES
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        and not torch.is_autocast_enabled("cpu")
    )
