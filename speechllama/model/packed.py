"""Linear layers of cached decoding on CPU through oneDNN's packed (blocked) weight layout.

Why: a decoder call multiplies only B·k rows (1..20 at batch 1..4, k = 1..5) by every weight
matrix. MKL's sgemm, which ``F.linear`` uses on CPU, is about as fast as memory allows for one
row but took ~1.4x as long for two to four rows (the 42 matmuls of the ``small`` decoder, 1
thread, loaded 2-core AMD EPYC: 3.8 ms for one row, 5.3 ms for four), which is what made a
k-token call cost far more than a 1-token call. With each weight reordered once into oneDNN's
blocked layout (q|k|v and gate|up concatenated, so 4 matmuls a layer instead of 7), four rows
cost 3.0 ms. The reorder is done with no batch-size hint, so one packed copy serves every row
count, and its rows do not depend on how many rows there are (checked bit for bit for 1..256
rows, fp32 and bf16, 1 and 2 threads). A single row keeps MKL unless the matrix is large or
``one_row`` is set, which ``SpeechLLaMA`` does for large decoders and whenever OpenMP threads
spin between regions (see :meth:`linear` and ``SpeechLLaMA._choose_packing``).

The packed copies live beside the parameters (they double the decoder's weight memory) and are
rebuilt whenever a weight changes (its storage or its version counter: an optimizer step,
``load_state_dict``, ``.to()``). They are used only where no gradient can be needed; training
and anything else (another device, autocast, a dtype oneDNN does not pack) take ``F.linear``.

With ``int8`` set (``SpeechLLaMA.set_decoder_int8``) the same store holds int8 copies instead,
and every row count goes through :mod:`speechllama.model.int8`.
"""

from __future__ import annotations

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
PACK_ONE_ROW_FROM = 1_000_000  # weight elements from which a 1-row fp32 call packs too
# Decoder weight bytes from which every 1-row fp32 call packs (``PackedLinears.one_row``): the
# weights then stream from memory at every call, where oneDNN's kernel beats MKL's gemv. Between
# the two models measured: ``small`` (38 MB, MKL faster) and SmolLM2 (540 MB: its 1-token call
# 39.0 -> 34.3 ms, 2 threads, session 5).
PACK_ALL_ONE_ROW_BYTES = 128 * 2**20


def _version(w: torch.Tensor) -> int:
    try:
        return w._version
    except RuntimeError:  # an inference tensor has no version counter and cannot change
        return -1


class PackedLinears:
    """Per-module store of packed (and, for several matrices, concatenated) weights.

    ``linear(x, name, weights)`` = ``F.linear(x, cat(weights))`` (B, T, sum of out features):
    several matrices reading the same input (q|k|v, gate|up) become one matmul. ``int8``: run
    those matmuls on int8 copies of the weights (an approximation, see ``model.int8``)."""

    def __init__(self) -> None:
        self._store: dict[str, tuple[tuple, Any]] = {}
        self.int8 = False
        self.one_row = False  # pack 1-row calls of every size (see PACK_ALL_ONE_ROW_BYTES)

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
        if self.int8 and int8_usable(x, w0):
            w8, scale = self._get(name, weights, quantize_weight)
            return int8_linear(x, w8, scale)
        # One fp32 row (a 1-token call at batch 1) keeps MKL's gemv unless ``one_row``: the
        # packed kernel was 0.6 ms slower per 1-token call of ``small`` (1 thread, one model
        # per process: 6.2-6.5 against 5.6-5.7 ms in three runs, under PASSIVE waits). bf16
        # packs at every row count: 4.3 ms against 5.7 per 1-token call, where ATen's bf16 gemv
        # is no faster than fp32.
        # Large matrices pack at one row too: oneDNN beat MKL's gemv from about 1M elements
        # (session 4, 2 threads, one row: SmolLM2's 3072 x 576 gate|up 89 against 152 us, its
        # 49152 x 576 output layer 4.6 against 9.7 ms), while every matrix of ``small`` is below
        # that and stays on MKL under PASSIVE waits (packing them all made its greedy 15% slower
        # end to end then; 1.20x faster with spinning threads, session 8).
        single = (
            x.numel() == x.shape[-1]
            and x.dtype == torch.float32
            and not self.one_row
            and sum(w.numel() for w in weights) < PACK_ONE_ROW_FROM
        )
        if single or not usable(x, w0):  # one matmul per matrix, bitwise the modules' own
            if len(weights) == 1:
                return F.linear(x, w0)
            return torch.cat([F.linear(x, w) for w in weights], dim=-1)
        packed = self._get(name, weights, lambda w: _REORDER(w, None))
        out = _LINEAR(x.reshape(-1, x.shape[-1]), packed, None, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    def clear(self) -> None:
        self._store.clear()

    def __deepcopy__(self, memo: dict) -> PackedLinears:
        copy = PackedLinears()  # a copy's weights live elsewhere: it packs its own
        copy.int8, copy.one_row = self.int8, self.one_row
        return copy

    def __getstate__(self) -> dict:
        return {"_store": {}, "int8": self.int8, "one_row": self.one_row}


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
