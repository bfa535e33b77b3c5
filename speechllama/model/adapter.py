"""Modality adapter: shorten the encoder's frame rate and map it into the decoder's space.

Stacking ``stack`` neighbouring frames divides the number of audio positions the decoder must
attend to (and prefill) by ``stack``, which is most of what makes an LLM decoder affordable on
speech; the projection then learns the mapping into the LLM's embedding space.
"""

from __future__ import annotations

import torch
from torch import nn

from speechllama.model.config import AdapterConfig


class Adapter(nn.Module):
    """(B, T, d_in) encoder frames -> (B, ceil(T / stack), d_out) audio embeddings.

    ``linear``: one projection of the stacked frames. ``mlp``: Linear -> GELU -> Linear with
    width ``cfg.hidden`` (0 = ``d_out``). ``cfg.input_norm == "utterance"``: per-utterance
    mean and variance normalisation of the frames first (see ``utterance_norm``).
    """

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int) -> None:
        super().__init__()
        self.stack = cfg.stack
        stacked = d_in * cfg.stack
        if cfg.kind == "linear":
            self.proj: nn.Module = nn.Linear(stacked, d_out)
        elif cfg.kind == "mlp":
            hidden = cfg.hidden or d_out
            self.proj = nn.Sequential(
                nn.Linear(stacked, hidden), nn.GELU(), nn.Linear(hidden, d_out)
            )
        else:
            raise ValueError(f"unknown adapter kind {cfg.kind!r}; choose linear or mlp")
        self.norm = nn.RMSNorm(d_out, eps=1e-6) if cfg.norm == "rms" else None
        self.input_norm = cfg.input_norm

    @torch.no_grad()
    def match_scale(self, embed: torch.Tensor) -> None:
        """Start the output norm's gain at ``embed``'s RMS (the (V, d) token embeddings), so
        audio and text positions enter the decoder at the same scale."""
        if self.norm is not None and not embed.is_meta:  # loading: the checkpoint sets it
            self.norm.weight.fill_(embed.float().pow(2).mean().sqrt().item())

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d_in), lens (B,) valid frames -> (B, S, d_out), lens (B,) = ceil(lens / stack).

        Frames past each sequence's length are zeroed before stacking, so a sequence's last
        (partial) group never mixes in another sequence's padding: outputs do not depend on
        what else is in the batch."""
        B, T, d = x.shape
        valid = torch.arange(T, device=x.device)[None, :] < lens[:, None]
        if self.input_norm == "utterance":
            x = utterance_norm(x, valid)
        x = x * valid[..., None].to(x.dtype)
        pad = -T % self.stack
        if pad:
            x = torch.cat([x, x.new_zeros(B, pad, d)], dim=1)
        x = x.reshape(B, (T + pad) // self.stack, self.stack * d)
        out = self.proj(x)
        if self.norm is not None:
            out = self.norm(out)
        return out, torch.div(lens + self.stack - 1, self.stack, rounding_mode="floor")


def utterance_norm(x: torch.Tensor, valid: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (B, T, d), valid (B, T) bool -> x with each utterance's channels at zero mean and unit
    variance over its valid frames (statistics in fp32; padding frames do not count, so the
    result does not depend on what else is in the batch). Frames past the length come out as
    garbage; the caller zeroes them."""
    mask = valid[..., None].to(torch.float32)
    n = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    xf = x.float()
    mean = (xf * mask).sum(dim=1, keepdim=True) / n
    var = ((xf - mean).pow(2) * mask).sum(dim=1, keepdim=True) / n
    return ((xf - mean) * torch.rsqrt(var + eps)).to(x.dtype)
