"""Decode-time precisions: the decoder's (``--dtype``) and the encoder's (``--encoder-dtype``).

Why the two are separate: they are bound by different things. A batch-1 decoder call of
``small`` multiplies one row by each weight matrix, so it is bound by reading the weights;
bf16 weights were no faster there on this project's CPUs (eager and compiled, docs/speed.md)
and moved WER by 1-2 points. The encoder multiplies hundreds of frames by the same matrices,
so it is bound by arithmetic, and CPUs with AMX (Intel Sapphire Rapids and later) multiply
bf16 tiles several times faster than fp32 vectors: on this project's development machine a
(335 x 384) x (384 x 1536) matmul took 1.52 ms in fp32 and 0.26 ms in bf16, and Whisper
tiny.en's encoder over real-smoke 1.6 s against 0.8-0.9 s, with WER unchanged within
noise on four test sets (docs/speed.md, session 13). So the encoder's default, ``auto``, is
bf16 where the CPU has AMX and fp32 elsewhere (without AMX, bf16 matmuls are emulated or run
on AVX-512-BF16 dot products and are no faster).

How bf16 runs: the input is padded to a multiple of ``FRAME_BUCKET`` frames (masked, so the
output at valid frames does not change), the encoder's Linear and Conv1d weights are stored in
bf16 (cast once, not at every call as autocast alone would do for fp32 weights) and the
encoder runs under ``torch.autocast``, which keeps the reductions autocast lists as fp32-only
in fp32. Its output goes back to fp32 before the adapter, so the adapter, the decoder and
everything after see the dtypes they were trained with.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from speechllama.model.speechllama import SpeechLLaMA

DECODE_PRECISIONS = ("float32", "bfloat16", "int8")
ENCODER_PRECISIONS = ("auto", "float32", "bfloat16")
# A bf16 encoder's input frames are padded to a multiple of this (0.32 s of 10 ms frames).
# oneDNN builds (JITs) its bf16 kernels for each new input shape: Whisper tiny.en's encoder
# took 32 ms on a new length against 17 ms on a length it had seen (700 frames, 2 threads),
# and every utterance of a test set has a length of its own. Buckets bound the shapes to
# about 94 per 30 s, for at most 31 padded (masked) frames of work.
FRAME_BUCKET = 32


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (bf16 matmuls in hardware), as torch sees it."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def encoder_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype ``--encoder-dtype name`` means on ``device``: ``auto`` is bf16 on a CPU with
    AMX and fp32 elsewhere (on a GPU, ``DecodingOptions.fp16`` is the half-precision switch)."""
    if name not in ENCODER_PRECISIONS:
        raise ValueError(
            f"unknown encoder precision {name!r}; choose {', '.join(ENCODER_PRECISIONS)}"
        )
    if name == "auto":
        return torch.bfloat16 if device.type == "cpu" and has_amx() else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def cast_matmul_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """Store the weights and biases of ``module``'s Linear and Conv1d layers in ``dtype``, in
    place; norms, positional tables and other buffers keep theirs."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d)):
            layer.to(dtype)


def bucket_length(t: int, limit: int | None = None) -> int:
    """The length a bf16 encoder's input of ``t`` frames is padded to: ``t`` rounded up to a
    multiple of ``FRAME_BUCKET``, but not past ``limit`` (the encoder's longest input), and
    never below ``t``."""
    target = -(-t // FRAME_BUCKET) * FRAME_BUCKET
    return target if limit is None else max(t, min(target, limit))


def bucket_frames(features: torch.Tensor, limit: int | None = None) -> torch.Tensor:
    """features (B, T, n_mels) -> (B, T', n_mels) zero-padded at the end to
    T' = :func:`bucket_length` (T, ``limit``)."""
    t = features.shape[1]
    target = bucket_length(t, limit)
    if target == t:
        return features
    return torch.nn.functional.pad(features, (0, 0, 0, target - t))


def warm_up_encoder(model: SpeechLLaMA, max_frames: int) -> float:
    """Build a bf16 encoder's kernels now for every bucket of batch-1 inputs up to
    ``max_frames`` feature frames (``serve`` does, so that no request pays a kernel build);
    returns the seconds it took. Nothing to do for an fp32 encoder."""
    if model.encoder_dtype == torch.float32:
        return 0.0
    start = time.perf_counter()
    limit = getattr(model.encoder, "max_input_frames", None)
    device = model.decoder.embed.weight.device
    n_mels = model.config.encoder.n_mels
    shapes = sorted({bucket_length(t, limit) for t in range(1, max_frames + 1)})
    with torch.inference_mode():
        for t in shapes:
            model.encode(torch.zeros(1, t, n_mels, device=device), torch.tensor([t], device=device))
    return time.perf_counter() - start
