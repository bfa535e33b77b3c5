"""One teacher-forced pass: batch -> audio embeddings -> logits -> losses.

Shared by the training step and the dev-loss evaluation so both score exactly the same thing.
A batch holds features (run encoder + adapter + decoder), cached encoder outputs (adapter +
decoder), or cached final decoder hidden states (the heads alone: heads-only training); a
frozen encoder runs without autograd, which saves its activations' memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from speechllama.train.data import Batch
from speechllama.train.losses import ctc_loss, head_accuracy_counts, multi_token_loss
from speechllama.train.text_only import TextBatch, text_logits


@dataclass(frozen=True)
class StepLoss:
    """``total`` = (1 - ctc_weight) * ce + ctc_weight * ctc [+ text_weight * text_ce],
    differentiable; the rest detached. ``per_head`` (K,) token-mean CE of each head;
    ``tokens`` target tokens of head 1; ``text_ce`` the weighted head CE of the text-only
    batch (0 without one, see ``train/text_only.py``).
    ``correct``/``scored`` (K,): top-1 hits and scored positions of each head (only when
    asked for: the argmax over the vocabulary is not free)."""

    total: torch.Tensor
    ce: float
    ctc: float
    per_head: tuple[float, ...]
    tokens: int
    correct: tuple[int, ...] = ()
    scored: tuple[int, ...] = ()
    text_ce: float = 0.0


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU and on GPUs that support it; a no-op when disabled.

    Only the model runs under it: losses are computed outside, in fp32, because log-softmax over
    a vocabulary in bf16 loses the small probabilities the loss is made of."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def embed(
    model: torch.nn.Module,
    batch: Batch,
    spec_augment: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch -> (audio embeddings (B, S, d_dec), lens (B,), encoder frames (B, T', d_enc), lens).

    ``spec_augment`` masks features before the encoder, or the cached encoder frames in time
    when the batch is already encoded (feature masks are no longer possible there)."""
    inputs, lens = batch.inputs.float(), batch.input_lens
    if spec_augment is not None:
        inputs = spec_augment(inputs, lens)
    encoder = model.encoder
    split = encoder_split(encoder)
    if batch.encoded:  # the cache holds the frozen part's output: lower() when split
        hidden, hidden_lens = inputs, lens
    elif split or not any(p.requires_grad for p in encoder.parameters()):
        with torch.no_grad():
            hidden, hidden_lens = (encoder.lower if split else encoder)(inputs, lens)
    else:
        hidden, hidden_lens = encoder(inputs, lens)
    if split:
        hidden, hidden_lens = encoder.upper(hidden, hidden_lens)
    emb, emb_lens = model.adapter(hidden, hidden_lens)
    return emb, emb_lens, hidden, hidden_lens


def encoder_split(encoder: torch.nn.Module) -> bool:
    """Whether ``encoder`` trains only its top blocks (``encoder.train_top``): its frozen
    ``lower()`` part then runs without autograd (or comes from the cache) and ``upper()`` with
    it. False when the top blocks are frozen too (``--freeze encoder``)."""
    top = getattr(encoder, "train_top", 0)
    if not top:
        return False
    return any(p.requires_grad for name, p in encoder.named_parameters()
               if name.startswith(encoder.top_prefixes()))  # fmt: skip


def heads_on_hidden(model: torch.nn.Module, batch: Batch, ctc_weight: float) -> torch.Tensor:
    """Logits (B, U, K, V) of the heads alone on a batch of cached final hidden states (B, U, d):
    the trunk does not run (heads-only training, ``train/hidden.py``)."""
    if model.heads.cache_layers:
        raise ValueError(f"{model.config.heads.kind!r} heads cannot run on cached hidden states")
    if ctc_weight > 0:
        raise ValueError("cached decoder hidden states hold no encoder frames for the CTC loss")
    return model.heads(batch.inputs.float())


def compute_loss(
    model: torch.nn.Module,
    batch: Batch,
    *,
    ctc_weight: float = 0.0,
    head_weights: tuple[float, ...] = (),
    bf16: bool = False,
    spec_augment: torch.nn.Module | None = None,
    accuracy: bool = False,
    text: TextBatch | None = None,
    text_weight: float = 0.0,
) -> StepLoss:
    """Forward ``batch`` through ``model`` (a SpeechLLaMA) and return its losses; with
    ``accuracy`` also each head's top-1 hit counts (see ``head_accuracy_counts``). ``text``: a
    text-only batch whose loss joins the total with ``text_weight``; it runs inside this one
    forward so that DDP sees a single pass."""
    device = batch.tokens.device
    ctc_logits = text_out = None
    with autocast(device, bf16):
        if text is not None:
            text_out = text_logits(model, text)
        if batch.hidden:
            logits = heads_on_hidden(model, batch, ctc_weight)
        else:
            emb, emb_lens, hidden, hidden_lens = embed(model, batch, spec_augment)
            logits = model(emb, emb_lens, batch.tokens, batch.label_lens)  # (B, U, K, V)
            if ctc_weight > 0:
                on_adapter = model.config.ctc_on == "adapter"
                ctc_in, ctc_lens = (emb, emb_lens) if on_adapter else (hidden, hidden_lens)
                ctc_logits = model.ctc_logits(ctc_in)
    ce = multi_token_loss(logits, batch.labels, batch.label_lens, head_weights)
    total = ce.total
    ctc_value = 0.0
    if ctc_logits is not None:
        ctc = ctc_loss(ctc_logits, ctc_lens, batch.ctc_targets, batch.ctc_lens, blank=0)
        total = (1.0 - ctc_weight) * total + ctc_weight * ctc
        ctc_value = float(ctc.detach())
    text_ce = 0.0
    if text_out is not None:
        text_loss = multi_token_loss(text_out, text.labels, text.label_lens, head_weights).total
        total = total + text_weight * text_loss
        text_ce = float(text_loss.detach())
    correct: tuple[int, ...] = ()
    scored: tuple[int, ...] = ()
    if accuracy:
        hits, counts = head_accuracy_counts(logits.detach(), batch.labels, batch.label_lens)
        correct, scored = tuple(hits.tolist()), tuple(counts.tolist())
    return StepLoss(
        total=total,
        ce=float(ce.total.detach()),
        ctc=ctc_value,
        per_head=tuple(float(x) for x in ce.per_head),
        tokens=int(ce.tokens[0]),
        correct=correct,
        scored=scored,
        text_ce=text_ce,
    )
