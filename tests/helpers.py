"""Shared setup of the model and decoding tests: tiny stand-in encoders and configs, seeded
inputs, the teacher-forced K-head training loop, one decode call, and spies on ``model.step``.

One copy here so that a change to how a test model is built, fitted or decoded reaches every
test that relies on it (the copies had started to differ only in names). Seeds and the order of
random draws are those of the tests that used them, so fitted weights are bit-identical."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from speechllama.decoding import DecodingOptions, get_strategy
from speechllama.decoding.base import Decoded, decode
from speechllama.model.config import (
    AdapterConfig,
    DecoderConfig,
    EncoderConfig,
    HeadsConfig,
    ModelConfig,
)
from speechllama.model.kv_cache import KVCache
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.train.losses import multi_token_loss

TOL = dict(atol=1e-5, rtol=1e-5)
N_MELS, D_ENC, VOCAB, D = 8, 12, 40, 32  # mel bins, encoder width, vocabulary, decoder width
BOS, EOS, PAD = 1, 2, 0
T = TypeVar("T")


class TinyEncoder(nn.Module):
    """Stand-in encoder: 2x subsampling by striding, then a projection."""

    output_dim = D_ENC

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(N_MELS, D_ENC)

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(feats[:, ::2]), torch.div(lens + 1, 2, rounding_mode="floor")


class IdentityEncoder(nn.Module):
    """Stand-in encoder: the decoding tests feed (B, S, D) audio embeddings straight to the
    decoder (with a linear stack-1 adapter), so what they decode is set by the test alone."""

    output_dim = D

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return feats, lens


def tiny_decoder(max_seq_len: int = 64, tied: bool = True, d_ff: int = 48) -> DecoderConfig:
    """2 layers of width D, 4 query and 2 key/value heads (grouped-query attention exercised)."""
    return DecoderConfig(
        vocab_size=VOCAB, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=d_ff,
        max_seq_len=max_seq_len, tie_embeddings=tied,
    )  # fmt: skip


def decoding_model(kind: str, num_heads: int, max_seq_len: int) -> SpeechLLaMA:
    """A fresh ``num_heads``-head model of ``kind`` (seed 0, train mode) for the decoding
    tests: identity encoder, tiny decoder with d_ff 64."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        encoder=EncoderConfig(n_mels=D),
        adapter=AdapterConfig(kind="linear", stack=1),
        decoder=tiny_decoder(max_seq_len, d_ff=64),
        heads=HeadsConfig(kind=kind, num_heads=num_heads),
        bos_id=BOS, eos_id=EOS, pad_id=PAD,
    )  # fmt: skip
    return SpeechLLaMA(cfg, encoder=IdentityEncoder()).train()


def fit(
    model: SpeechLLaMA,
    audio: torch.Tensor,
    audio_lens: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float = 1e-2,
) -> SpeechLLaMA:
    """Overfit labels (B, U) = y EOS, fed [BOS] y teacher-forced, with ``steps`` full-batch Adam
    steps on the K-head loss; returns the model in eval mode."""
    n = labels.shape[0]
    tokens = torch.cat([torch.full((n, 1), BOS), labels[:, :-1]], dim=1)
    lens = torch.full((n,), labels.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        logits = model(audio, audio_lens, tokens, lens)
        multi_token_loss(logits, labels, lens).total.backward()
        opt.step()
    return model.eval()


def held_out(audio: torch.Tensor, kept: int, lens: list[int], g: torch.Generator) -> torch.Tensor:
    """Decode audio (B, S, D) from training audio: rows < ``kept`` as they were, the others
    perturbed by 0.7 N(0, 1) (drawn from ``g``) so the heads are less sure; zero past ``lens``."""
    noise = 0.7 * torch.randn(audio.shape[0] - kept, *audio.shape[1:], generator=g)
    test = torch.cat([audio[:kept], audio[kept:] + noise])
    for b, n in enumerate(lens):
        test[b, n:] = 0
    return test


def run_decoding(
    model: SpeechLLaMA,
    audio: torch.Tensor,
    lens: torch.Tensor,
    durations: list[float],
    compact: bool = True,
    eos_id: int = EOS,
    **opts,
) -> list[Decoded]:
    """Decode a batch with ``DecodingOptions(**opts)`` up to the model's max_seq_len."""
    with torch.inference_mode():
        return decode(
            model, get_strategy(DecodingOptions(**opts), model), audio, lens, durations,
            eos_id=eos_id, pad_id=PAD, max_seq_len=model.config.decoder.max_seq_len,
            compact=compact,
        )  # fmt: skip


def summary(out: list[Decoded]) -> list[tuple]:
    """What a strategy must reproduce per row: tokens, decoder calls, accepted-per-call."""
    return [(d.tokens, d.decoder_calls, d.accepted_per_call) for d in out]


def record_steps(
    model: SpeechLLaMA,
    monkeypatch: pytest.MonkeyPatch,
    record: Callable[[torch.Tensor, KVCache, torch.Tensor | None, int | None], T],
) -> list[T]:
    """Spy on ``model.step``: before each call, append ``record(tokens, cache, tree_mask,
    num_heads)`` (which may also assert) to the returned list, then run the real step."""
    seen: list[T] = []
    real_step = model.step

    def spy(tokens, cache, tree_mask=None, num_heads=None):
        seen.append(record(tokens, cache, tree_mask, num_heads))
        return real_step(tokens, cache, tree_mask, num_heads)

    monkeypatch.setattr(model, "step", spy)
    return seen


def cache_overruns(
    model: SpeechLLaMA, monkeypatch: pytest.MonkeyPatch, lens: list[int], limits: list[int]
) -> list[list[int]]:
    """Spy on ``model.step``: record, per call, each row's cache length minus its bound
    [audio][BOS] + limit - 1 (the most a row may hold: all but its last token), > 0 = overrun."""
    bound = [n + m for n, m in zip(lens, limits, strict=True)]
    return record_steps(
        model, monkeypatch,
        lambda tokens, cache, *_: [
            int(x) - c for x, c in zip(cache.lengths.tolist(), bound, strict=True)
        ],
    )  # fmt: skip


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ids(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def ragged_batch() -> dict[str, torch.Tensor]:
    """Ragged audio (7, 4, 2 embeddings of width D) and ragged text (6, 3, 5 tokens incl. BOS)."""
    tokens = ids(3, 6, seed=1)
    tokens[:, 0] = BOS
    return {
        "audio": rand(3, 7, D, seed=2),
        "audio_lens": torch.tensor([7, 4, 2]),
        "tokens": tokens,
        "token_lens": torch.tensor([6, 3, 5]),
    }


def assert_valid_close(got: torch.Tensor, ref: torch.Tensor, lens: torch.Tensor, start: int):
    """Compare (B, k, ...) positions start..start+k-1 where they are real text (< lens[b])."""
    for b, n in enumerate(lens.tolist()):
        m = max(0, min(got.shape[1], n - start))
        torch.testing.assert_close(got[b, :m], ref[b, start : start + m], **TOL)


def assert_rollback_equals_fresh(
    model: SpeechLLaMA, batch: dict[str, torch.Tensor], proposed: torch.Tensor,
    accepted: torch.Tensor,
) -> KVCache:  # fmt: skip
    """Prefill, feed ``proposed`` (3, 4), roll back to keep 1, 0, 3 of them, feed ``accepted``
    (3, 2): each row's logits must equal a fresh teacher-forced pass over
    [audio][BOS] + kept + accepted. Returns the cache for further checks."""
    audio, audio_lens = batch["audio"], batch["audio_lens"]
    cache = model.new_cache(3, 32)
    model.prefill(audio, audio_lens, cache)
    model.step(proposed, cache)
    cache.truncate(cache.lengths - torch.tensor([3, 4, 1]))  # keep 1, 0, 3 proposed tokens
    out = model.step(accepted, cache)
    for b, kept in enumerate([1, 0, 3]):
        s = int(audio_lens[b])
        tokens = torch.cat([torch.tensor([1]), proposed[b, :kept], accepted[b]])[None]
        with torch.no_grad():
            ref = model(
                audio[b : b + 1, :s], audio_lens[b : b + 1], tokens, torch.tensor([3 + kept])
            )
        torch.testing.assert_close(out[b], ref[0, 1 + kept :], **TOL)
    return cache


# --- a stand-in for Debian's extracted Asterisk prompt packages -----------------------------

_TRANSCRIPTS = """\
; Core Asterisk Sounds in English

agent-alreadyon: That agent is already logged on.  Please enter your agent number.
auth-thankyou: Thank you.
beep: [this is a simple beep tone]
conf-adminmenu: Please press 1 to mute or unmute yourself, or 8 to exit.
dictate/both_help: press * to toggle pause, press # to enter a new dictation filename
dictate/forhelp: Please wait while we connect you to an operator now.
missing-audio: This prompt has a transcript but no recording at all.
too-long: This one has words enough but runs far past the limit.
"""


def asterisk_tree(root: Path) -> Path:
    """An extracted-packages layout: transcripts under usr/share/doc, 8 kHz wavs under
    usr/share/asterisk/sounds/en_US_f_Allison (one in a subfolder)."""
    doc = root / "usr/share/doc/asterisk-core-sounds-en"
    doc.mkdir(parents=True)
    with gzip.open(doc / "core-sounds-en.txt.gz", "wt", encoding="utf-8") as f:
        f.write(_TRANSCRIPTS)
    sounds = root / "usr/share/asterisk/sounds/en_US_f_Allison"
    seconds = {
        "agent-alreadyon": 2.0,
        "auth-thankyou": 0.5,
        "beep": 0.2,
        "conf-adminmenu": 3.0,
        "dictate/both_help": 3.0,
        "dictate/forhelp": 2.5,
        "too-long": 31.0,
    }
    for name, secs in seconds.items():
        path = sounds / f"{name}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.zeros(int(8000 * secs), dtype=np.float32), 8000, subtype="PCM_16")
    return root
