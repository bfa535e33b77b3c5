"""Int8 decoder calls on CPU: int8 weights per output channel, int8 activations per row, exact
int32 accumulation (``torch._int_mm``).

Why: at batch 1 a decoder call is bound by reading its weights from memory, not by arithmetic
(the ``small`` decoder's 42 matrices are ~38 MB in fp32, more than the caches hold). One cold
384 x 1024 matrix times one row took 174 us in fp32 and 15.5 us as an int8 ``_int_mm`` (1
thread, AMD EPYC with avx512_vnni, session 5).

Why per-row activation scales, and not fbgemm's dynamic quantisation (``torch.ao``, also
deprecated): fbgemm quantises the whole input with one scale, so a row's output depends on the
other rows of the call, and the other utterances of a batch would change an utterance's
transcript. Here each row has its own scale and integer sums are exact in any order, so every
matmul's output for a row is bit for bit the same whatever else is in the call (tested).

Verification against greedy: the attention of a k-token call still differs from a 1-token
call's by float rounding (~1e-6, as in fp32), and where an activation sits on an int8 rounding
boundary that difference becomes one quantisation step. So int8 verify-exact equals int8
greedy almost always, not always: on 47 of 47 real-smoke and 149 of 150 synth-heldout
utterances of the default model (session 5), where fp32 matched on all of them.

Measured (session 5, batch 1, 2 threads, nothing else running; docs/smollm.md): ``small``'s
greedy decoder time 1.12-1.18x lower, WER 62.50 -> 64.71% on real-smoke and 51.23 -> 50.35%
on synth-heldout; SmolLM2's 1-token call 35.6 -> 19.7 ms (``scripts/llm_call_speed.py``), its
greedy decoding 1.38x faster.
"""

from __future__ import annotations

import torch

_AVAILABLE = hasattr(torch, "_int_mm")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (w8 (K, N) int8, scale (N,) fp32) with weight ~ w8.T * scale.

    Symmetric, one scale per output channel (row of ``weight``). ``w8`` is the transpose view
    of an (N, K) contiguous tensor: the column-major layout that ``_int_mm`` is fastest with
    (15.5 against 37.5 us for the row-major copy in the measurement above)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    w8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return w8.t(), scale


def int8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) float -> (..., N) in x's dtype, approximately ``F.linear(x, weight)``.

    Each row of x is scaled by its own absolute maximum into [-127, 127] and rounded; the
    int32 products are rescaled by the row's and the channel's scales."""
    rows = x.reshape(-1, x.shape[-1]).float()
    row_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    x8 = torch.round(rows / row_scale).clamp(-127, 127).to(torch.int8)
    out = torch._int_mm(x8, w8).float().mul_(row_scale).mul_(scale)
    return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether an int8 call can stand in for ``F.linear(x, weight)`` here: CPU, a float input,
    no autograd through the weight or the input."""
    return (
        _AVAILABLE
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.is_floating_point()
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
    )
