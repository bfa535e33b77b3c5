"""LoRA deltas on the decoder (``speechllama.model.lora``): a fresh delta is the identity,
merging equals the parametrized model, only the factors train, checkpoints round-trip, and a
``--init`` checkpoint gains LoRA through ``--model-set decoder.lora_rank=R``.

The ``smollm`` case (deltas on the frozen GGUF LLM, only factors stored) is in test_smollm.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speechllama.checkpoint import load_checkpoint, save_checkpoint
from speechllama.model.config import preset
from speechllama.model.lora import base_name, is_lora_name, lora_parameters, merge_lora
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.text import train_tokenizer
from speechllama.train.build import build_model

torch.set_num_threads(1)

VOCAB = 64
RANK = 4
TOK_VOCAB = 36  # what the fixture's few sentences allow


def _inputs(vocab: int = VOCAB) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(2, 5, 64, generator=g)
    tokens = torch.randint(4, vocab, (2, 4), generator=g)
    return audio, torch.tensor([5, 3]), tokens, torch.tensor([4, 2])


def _pair() -> tuple[SpeechLLaMA, SpeechLLaMA]:
    """A tiny model and the same weights with rank-4 LoRA on every decoder linear."""
    plain = SpeechLLaMA(preset("tiny", VOCAB)).eval()
    lora = SpeechLLaMA(preset("tiny", VOCAB).with_overrides({"decoder.lora_rank": RANK})).eval()
    state = {base_name(k): v for k, v in lora.state_dict().items() if not is_lora_name(k)}
    plain.load_state_dict(state)
    return plain, lora


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.1 * torch.randn_like(p))


def test_fresh_delta_leaves_the_model_unchanged() -> None:
    plain, lora = _pair()
    n_factors = 2 * 7 * preset("tiny", VOCAB).decoder.n_layers  # A and B on 7 linears a layer
    assert len(list(lora_parameters(lora))) == n_factors
    with torch.no_grad():
        assert torch.equal(plain(*_inputs()), lora(*_inputs()))


def test_merge_equals_the_parametrized_model_and_drops_the_factors() -> None:
    _, lora = _pair()
    _perturb(lora)
    with torch.no_grad():
        before = lora(*_inputs())
        assert merge_lora(lora.decoder) == 7 * 2
        after = lora(*_inputs())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not list(lora_parameters(lora))
    assert not any(".parametrizations." in k for k in lora.state_dict())


def test_only_the_factors_get_gradients_when_the_base_is_frozen() -> None:
    _, lora = _pair()
    lora.train()
    lora.decoder.requires_grad_(False)
    for p in lora_parameters(lora.decoder):
        p.requires_grad_(True)
    loss = lora(*_inputs()).logsumexp(-1).mean()
    loss.backward()
    for name, p in lora.decoder.named_parameters():
        assert (p.grad is not None) == is_lora_name(name), name


def test_cached_decoder_calls_see_the_deltas() -> None:
    """Decoder calls read ``.weight`` for their packed q|k|v matmul: a delta must reach them."""
    plain, lora = _pair()
    _perturb(lora)
    audio, lens, _, _ = _inputs()

    def prefill(model: SpeechLLaMA) -> torch.Tensor:
        return model.prefill(audio, lens, model.new_cache(2, 16), num_heads=1)

    with torch.no_grad():
        merged = SpeechLLaMA(lora.config).eval()
        merged.load_state_dict(lora.state_dict())
        merge_lora(merged.decoder)
        ref, got, base = prefill(merged), prefill(lora), prefill(plain)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (base - ref).abs().max() > 1e-2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "one", "two"]
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    return train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tok.model", TOK_VOCAB)


def test_init_checkpoint_gains_lora_and_round_trips(tokenizer, tmp_path: Path) -> None:
    base, _ = build_model("tiny", None, tokenizer, ctc=False)
    first = save_checkpoint(base.eval(), tokenizer, tmp_path / "base")
    lora = {"decoder.lora_rank": RANK, "decoder.lora_alpha": 8.0}
    model, _ = build_model(None, str(first), None, ctc=False, overrides=lora)
    assert model.config.decoder.lora_rank == RANK and model.decoder.cfg.lora_alpha == 8.0
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(*_inputs(TOK_VOCAB)), base(*_inputs(TOK_VOCAB)), rtol=0, atol=0
        )
    _perturb(model)
    with torch.no_grad():
        expected = model(*_inputs(TOK_VOCAB))
    second = save_checkpoint(model, tokenizer, tmp_path / "lora")
    again, _, _ = load_checkpoint(second)
    merged, _, _ = load_checkpoint(second, merge_lora=True)
    with torch.no_grad():
        assert torch.equal(again(*_inputs(TOK_VOCAB)), expected)
        torch.testing.assert_close(merged(*_inputs(TOK_VOCAB)), expected, rtol=1e-5, atol=1e-5)
    assert not list(lora_parameters(merged))


def test_init_refuses_other_overrides_and_a_second_lora(tokenizer, tmp_path: Path) -> None:
    base, _ = build_model("tiny", None, tokenizer, ctc=False,
                          overrides={"decoder.lora_rank": 2})  # fmt: skip
    ckpt = save_checkpoint(base.eval(), tokenizer, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="keeps its config"):
        build_model(None, str(ckpt), None, ctc=False, overrides={"decoder.dropout": 0.2})
    with pytest.raises(ValueError, match="already has LoRA"):
        build_model(None, str(ckpt), None, ctc=False, overrides={"decoder.lora_rank": 4})


def test_parameter_counts_show_the_factors_apart() -> None:
    """``info``'s table: LoRA factors are their own part, trainable beside a frozen decoder."""
    _, lora = _pair()
    lora.decoder.requires_grad_(False)
    for p in lora_parameters(lora.decoder):
        p.requires_grad_(True)
    counts = lora.num_parameters()
    factors = sum(p.numel() for p in lora_parameters(lora.decoder))
    assert counts["decoder_lora"] == {"trainable": factors, "frozen": 0}
    assert counts["decoder"]["trainable"] == 0 and counts["decoder"]["frozen"] > 0
