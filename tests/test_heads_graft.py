"""Continuing a multi-token model's trunk and putting its heads back: ``next_token_model``,
``copy_heads`` and how ``train --init`` re-heads a checkpoint (``--heads 1 --head-kind linear``,
``--heads-from``, loss weights alone)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import N_MELS, TinyEncoder, tiny_decoder

from speechllama.model.config import AdapterConfig, EncoderConfig, HeadsConfig, ModelConfig
from speechllama.model.heads import copy_heads, expand_heads, next_token_model
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.train.build import _reheaded

torch.set_num_threads(1)
LATENT = HeadsConfig(kind="latent", num_heads=3)


def _trained_latent(seed: int) -> SpeechLLaMA:
    """A latent 3-head model whose heads 2-3 are trained (random maps) and head 1 is the plain
    un-embedding, as heads-only training leaves it."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        encoder=EncoderConfig(n_mels=N_MELS),
        adapter=AdapterConfig(kind="linear", stack=2),
        decoder=tiny_decoder(tied=True),
        heads=LATENT,
    )
    model = SpeechLLaMA(cfg, encoder=TinyEncoder()).eval()
    d = cfg.decoder.d_model
    with torch.no_grad():
        model.heads.maps[d:].add_(torch.randn_like(model.heads.maps[d:]) * 0.3)
    return model


def test_trunk_then_heads_back_is_the_same_model(batch: dict) -> None:
    mtp = _trained_latent(seed=1)
    trunk = next_token_model(mtp)
    assert trunk.config.heads == HeadsConfig(kind="linear", num_heads=1)
    assert mtp.config.heads == LATENT  # the source is not touched
    with torch.no_grad():
        ref = mtp(**batch)
        torch.testing.assert_close(trunk(**batch)[:, :, 0], ref[:, :, 0], atol=1e-6, rtol=0)
    back = expand_heads(trunk, LATENT)
    with torch.no_grad():  # fresh heads are copies of head 1, not the trained ones
        assert not torch.allclose(back(**batch)[:, :, 1], ref[:, :, 1])
    assert copy_heads(back, mtp) == ["maps"]
    assert back.heads.proj.weight is back.decoder.embed.weight  # still tied to its own trunk
    with torch.no_grad():
        torch.testing.assert_close(back(**batch), ref, atol=1e-6, rtol=0)


def test_heads_of_an_earlier_trunk_keep_the_new_trunk_head_one(batch: dict) -> None:
    old, new = _trained_latent(seed=1), _trained_latent(seed=2)
    trunk = next_token_model(new)
    grafted = expand_heads(trunk, LATENT)
    copy_heads(grafted, old)
    with torch.no_grad():
        torch.testing.assert_close(grafted(**batch)[:, :, 0], new(**batch)[:, :, 0])
        assert torch.equal(grafted.heads.maps, old.heads.maps)


def test_a_trained_head_one_or_other_heads_are_refused() -> None:
    joint = _trained_latent(seed=3)
    d = joint.config.decoder.d_model
    with torch.no_grad():
        joint.heads.maps[:d].add_(0.1)  # head 1 trained with the trunk: not the trunk alone
    with pytest.raises(ValueError, match="plain un-embedding"):
        next_token_model(joint)
    two = expand_heads(next_token_model(_trained_latent(seed=4)), HeadsConfig("latent", 2))
    with pytest.raises(ValueError, match="heads differ"):
        copy_heads(two, _trained_latent(seed=4))


def test_heads_trained_with_loss_weights_graft_onto_unweighted_ones() -> None:
    # A joint-trained donor stores its head-loss weights in its config; they say how the heads
    # were trained, not what they are, so they do not block the graft.
    donor, target = _trained_latent(seed=6), _trained_latent(seed=7)
    donor.config = donor.config.replace(
        heads=replace(donor.config.heads, loss_weights=(1.0, 0.2, 0.1, 0.1)[: LATENT.num_heads])
    )
    copy_heads(target, donor)
    assert torch.equal(target.heads.maps, donor.heads.maps)


def test_reheading_a_checkpoint(batch: dict) -> None:
    mtp = _trained_latent(seed=5)
    weighted = HeadsConfig(kind="latent", num_heads=3, loss_weights=(1.0, 0.5, 0.5))
    same = _reheaded(mtp, weighted)  # loss weights alone keep the trained heads
    assert same is mtp and same.config.heads == weighted
    with torch.no_grad():
        maps = mtp.heads.maps.clone()
    assert torch.equal(same.heads.maps, maps)
    trunk = _reheaded(mtp, HeadsConfig(kind="linear", num_heads=1))
    assert trunk.config.heads.kind == "linear" and trunk.heads.num_heads == 1
    fresh = _reheaded(mtp, HeadsConfig(kind="latent", num_heads=2))
    assert fresh.config.heads.num_heads == 2
