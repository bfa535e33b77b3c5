"""Multi-token heads: shapes, target shifting, parameter formulas, identity starts, cached
decoding equal to teacher forcing (every kind, ``layer`` with its own cache layers), fewer heads
at decode time, converting a next-token model, and checkpoints that carry the heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    N_MELS,
    TOL,
    VOCAB,
    D,
    TinyEncoder,
    assert_rollback_equals_fresh,
    assert_valid_close,
    fit,
    ids,
    rand,
    tiny_decoder,
)
from torch import nn

from speechllama.model.config import AdapterConfig, EncoderConfig, HeadsConfig, ModelConfig, preset
from speechllama.model.heads import HEADS, build_heads, expand_heads, heads_parameter_report
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.train.losses import multi_token_loss

torch.set_num_threads(1)
K = 3
KINDS = ("projection", "latent", "medusa", "layer")


def _config(kind: str = "linear", k: int = 1, tied: bool = True, blocks: int = 1) -> ModelConfig:
    return ModelConfig(
        encoder=EncoderConfig(n_mels=N_MELS),
        adapter=AdapterConfig(kind="linear", stack=2),
        decoder=tiny_decoder(tied=tied),
        heads=HeadsConfig(kind=kind, num_heads=k, medusa_blocks=blocks),
    )


def _model(kind: str = "linear", k: int = 1, tied: bool = True, seed: int = 0, **kw) -> SpeechLLaMA:
    torch.manual_seed(seed)
    return SpeechLLaMA(_config(kind, k, tied, **kw), encoder=TinyEncoder()).eval()


def _scramble(module: nn.Module, seed: int) -> None:
    """Random weights everywhere (zero-initialised blocks included), so a test cannot pass
    because every head still equals head 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 1.0))


@pytest.fixture(scope="module", params=KINDS)
def scrambled(request: pytest.FixtureRequest) -> SpeechLLaMA:
    model = _model(request.param, K)
    _scramble(model, seed=3)
    return model


# --- registry, shapes, parameter counts -------------------------------------------------------


def test_every_kind_is_registered_and_shapes_follow_num_heads() -> None:
    assert set(HEADS) == {"linear", *KINDS}
    for kind in KINDS:
        model = _model(kind, K)
        hidden = rand(2, 5, D, seed=4)
        assert model.heads(hidden).shape == (2, 5, K, VOCAB)
        for n in (1, 2):
            out = model.heads(hidden, num_heads=n)
            assert out.shape == (2, 5, n, VOCAB)
        with pytest.raises(ValueError, match="num_heads=4"):
            model.heads(hidden, num_heads=4)
        select = torch.tensor([[4, 0], [2, 2]])
        picked = model.heads(hidden, select=select)
        torch.testing.assert_close(picked[1, 0], model.heads(hidden)[1, 2], **TOL)
    with pytest.raises(ValueError, match="medusa_blocks"):
        _config("medusa", K, blocks=0).validate()


def _formula(kind: str, k: int, blocks: int = 1) -> int:
    """The added parameters each kind should have, from its definition."""
    dec = _config().decoder
    d, v, f, h = dec.d_model, dec.vocab_size, dec.d_ff, dec.head_dim
    block = 2 * d + d * dec.n_heads * h * 2 + 2 * d * dec.n_kv_heads * h + 3 * d * f
    return {
        "projection": (k - 1) * d * v,
        "latent": k * d * d,
        "medusa": (k - 1) * blocks * (d * d + d),
        "layer": (k - 1) * block,
    }[kind]


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_counts_match_the_formulas(tied: bool) -> None:
    base = _model("linear", 1, tied).num_parameters()["heads"]["trainable"]
    assert base == (0 if tied else D * VOCAB)  # tied: the embedding, counted in the decoder
    for kind in KINDS:
        for k, blocks in ((2, 1), (4, 2)):
            model = _model(kind, k, tied, blocks=blocks)
            assert model.heads.added_parameters() == _formula(kind, k, blocks), kind
            assert model.num_parameters()["heads"]["trainable"] == base + _formula(kind, k, blocks)
    report = heads_parameter_report(_config("latent", 4, tied, blocks=2))
    assert report == {kind: _formula(kind, 4, 2) for kind in KINDS}
    assert heads_parameter_report(_config(), num_heads=1)["linear"] == 0
    assert heads_parameter_report(_config(), num_heads=3)["projection"] == 2 * D * VOCAB


def test_linear_refuses_more_than_one_head() -> None:
    with pytest.raises(ValueError, match="num_heads=2"):
        build_heads(_config("linear", 2), nn.Embedding(VOCAB, D))


# --- identity starts, conversion ----------------------------------------------------------------


def test_fresh_latent_head_one_is_exactly_the_base_model(batch: dict) -> None:
    base, latent = _model("linear", 1, seed=5), _model("latent", 4, seed=5)
    with torch.no_grad():
        ref, got = base(**batch), latent(**batch)
    assert got.shape == (3, 6, 4, VOCAB)
    # The identity map is exact; the un-embedding matmul may sum in another order (a GEMM of
    # 4x the rows), so allow float32 rounding only.
    torch.testing.assert_close(got[:, :, 0], ref[:, :, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tied", [True, False])
def test_expand_heads_keeps_the_next_token_model(kind: str, tied: bool, batch: dict) -> None:
    base = _model("linear", 1, tied, seed=6)
    _scramble(base.decoder, seed=7)
    _scramble(base.heads, seed=8)  # untied: an output layer unlike the embedding
    new = expand_heads(base, HeadsConfig(kind=kind, num_heads=K, loss_weights=(1.0, 0.5, 0.25)))
    assert new.config.heads.kind == kind and base.config.heads.kind == "linear"
    assert (new.heads.proj.weight is new.decoder.embed.weight) == tied
    assert new.decoder.embed.weight is not base.decoder.embed.weight  # a copy, not a view
    with torch.no_grad():
        ref, got = base(**batch), new(**batch)
    for k in range(K):  # head 1 is the old model; the others start as copies of it
        torch.testing.assert_close(got[:, :, k], ref[:, :, 0], atol=1e-6, rtol=0)
    again = expand_heads(new, HeadsConfig(kind="latent", num_heads=2))  # via its head 1
    with torch.no_grad():
        torch.testing.assert_close(again(**batch)[:, :, 1], ref[:, :, 0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="loss_weights"):
        expand_heads(base, HeadsConfig(kind=kind, num_heads=2, loss_weights=(1.0,)))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_started_blocks_still_learn(kind: str, batch: dict) -> None:
    """Zero-started outputs get a gradient at once; what feeds them (a layer head's attention
    and gate) gets one from the second step, once the outputs are no longer zero."""
    model = _model(kind, K).train()
    opt = torch.optim.SGD(model.heads.parameters(), lr=0.1)
    labels = torch.roll(batch["tokens"], -1, dims=1)
    for _ in range(2):
        opt.zero_grad()
        multi_token_loss(model(**batch), labels, batch["token_lens"]).total.backward()
        grads = {name: p.grad.abs().sum() for name, p in model.heads.named_parameters()}
        assert all(g > 0 for name, g in grads.items() if "wo" in name or "w_down" in name)
        opt.step()
    assert all(g > 0 for g in grads.values()), [name for name, g in grads.items() if g == 0]


# --- target shifting ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_training_teaches_head_k_the_token_k_ahead(kind: str) -> None:
    """Overfit one utterance with the K-head loss: head k's argmax at text position u must be
    label u + k (the shift the loss and the forward layout agree on), for every kind."""
    model = _model(kind, K, seed=9).train()
    audio, audio_lens = rand(1, 3, D, seed=10), torch.tensor([3])
    labels = torch.tensor([[7, 12, 5, 30, 21, 9, 2]])  # y EOS
    tokens = torch.cat([torch.tensor([[1]]), labels[:, :-1]], dim=1)  # BOS y
    lens = torch.tensor([7])
    fit(model, audio, audio_lens, labels, steps=150, lr=3e-2)
    with torch.no_grad():
        pred = model(audio, audio_lens, tokens, lens).argmax(-1)[0]  # (U, K)
    for k in range(K):
        assert pred[: 7 - k, k].tolist() == labels[0, k:].tolist(), f"head {k + 1}"


# --- cached decoding equals teacher forcing ------------------------------------------------------


def test_prefill_and_steps_equal_teacher_forcing(scrambled: SpeechLLaMA, batch: dict) -> None:
    with torch.no_grad():
        ref = scrambled(**batch)
    assert ref.shape == (3, 6, K, VOCAB)
    tokens, lens = batch["tokens"], batch["token_lens"]
    cache = scrambled.new_cache(3, 32)
    assert cache.k.shape[0] == 2 + scrambled.heads.cache_layers
    first = scrambled.prefill(batch["audio"], batch["audio_lens"], cache)
    torch.testing.assert_close(first[:, 0], ref[:, 0], **TOL)
    assert_valid_close(scrambled.step(tokens[:, 1:2], cache), ref, lens, start=1)
    assert_valid_close(scrambled.step(tokens[:, 2:6], cache), ref, lens, start=2)


def test_fewer_heads_at_decode_time(scrambled: SpeechLLaMA, batch: dict) -> None:
    with torch.no_grad():
        ref = scrambled(**batch)[:, :, :2]
    tokens, lens = batch["tokens"], batch["token_lens"]
    cache = scrambled.new_cache(3, 32)
    first = scrambled.prefill(batch["audio"], batch["audio_lens"], cache, num_heads=2)
    assert first.shape == (3, 1, 2, VOCAB)
    torch.testing.assert_close(first[:, 0], ref[:, 0], **TOL)
    assert_valid_close(scrambled.step(tokens[:, 1:6], cache, num_heads=2), ref, lens, start=1)


def test_rollback_and_tree_mask_move_the_head_caches(scrambled: SpeechLLaMA, batch: dict) -> None:
    audio, audio_lens = batch["audio"], batch["audio_lens"]
    proposed, accepted = ids(3, 4, seed=11), ids(3, 2, seed=12)
    cache = assert_rollback_equals_fresh(scrambled, batch, proposed, accepted)
    # Beam reorder moves the heads' cache layers with the trunk's.
    scrambled.prefill(audio, audio_lens, cache)
    scrambled.step(proposed[:, :2], cache)
    cache.reorder(torch.tensor([2, 2, 0]))  # rows: old 2, old 2, old 0
    moved = scrambled.step(accepted[[0, 0, 1]], cache)
    torch.testing.assert_close(moved[0], moved[1], **TOL)
    scrambled.prefill(audio, audio_lens, cache)
    scrambled.step(proposed[:, :2], cache)
    ref = scrambled.step(accepted[[1, 1, 0]], cache)
    torch.testing.assert_close(moved[[0, 2]], ref[[2, 0]], **TOL)
    # Two branches in one call, [a, b] and [a, c]: c sees a but not b, so its logits equal
    # those of the plain sequence [a, c].
    a_b_c, tree = ids(3, 3, seed=13), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]]).bool()
    scrambled.prefill(audio, audio_lens, cache)
    branched = scrambled.step(a_b_c, cache, tree_mask=tree)
    scrambled.prefill(audio, audio_lens, cache)
    plain = scrambled.step(a_b_c[:, [0, 2]], cache)
    torch.testing.assert_close(branched[:, 2], plain[:, 1], **TOL)


def test_layer_heads_refuse_a_cache_without_their_layers(batch: dict) -> None:
    model = _model("layer", K)
    cache = model.decoder.new_cache(3, 32)
    with pytest.raises(ValueError, match=r"model\.new_cache"):
        model.prefill(batch["audio"], batch["audio_lens"], cache)
    model.prefill(batch["audio"], batch["audio_lens"], cache, num_heads=1)  # needs none


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_carries_heads_k_and_weights(tmp_path: Path) -> None:
    from speechllama.checkpoint import load_checkpoint, save_checkpoint
    from speechllama.text import train_tokenizer

    sentences = [f"the {w} sat on the mat number {i}" for i, w in enumerate(["cat", "dog"] * 20)]
    tok = train_tokenizer(sentences, tmp_path / "tok.model", vocab_size=28)
    torch.manual_seed(14)
    heads = HeadsConfig(kind="medusa", num_heads=3, loss_weights=(1.0, 0.6, 0.3), medusa_blocks=2)
    model = SpeechLLaMA(preset("tiny", tok.vocab_size).replace(heads=heads)).eval()
    _scramble(model.heads, seed=15)
    loaded, _, doc = load_checkpoint(save_checkpoint(model, tok, tmp_path / "ckpt"))
    assert doc["model"]["heads"] == {
        "kind": "medusa", "num_heads": 3, "loss_weights": [1.0, 0.6, 0.3], "medusa_blocks": 2,
    }  # fmt: skip
    assert loaded.config == model.config
    hidden = rand(2, 4, 64, seed=16)
    with torch.no_grad():
        assert torch.equal(loaded.heads(hidden), model.heads(hidden))
