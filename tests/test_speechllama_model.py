"""The assembled model: adapter, K=1 head, teacher forcing against prefill + cached steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import (
    D_ENC,
    N_MELS,
    TOL,
    VOCAB,
    TinyEncoder,
    assert_rollback_equals_fresh,
    assert_valid_close,
    ids,
    rand,
    tiny_decoder,
)

from speechllama.model.adapter import Adapter
from speechllama.model.config import AdapterConfig, EncoderConfig, HeadsConfig, ModelConfig
from speechllama.model.heads import LinearHead, build_heads
from speechllama.model.speechllama import SpeechLLaMA, with_pretrained_decoder

torch.set_num_threads(1)


def _config(tied: bool = True, ctc: bool = True, max_seq_len: int = 64) -> ModelConfig:
    return ModelConfig(
        encoder=EncoderConfig(n_mels=N_MELS),
        adapter=AdapterConfig(kind="mlp", stack=2, hidden=20),
        decoder=tiny_decoder(max_seq_len, tied),
        ctc=ctc,
    )


def _model(tied: bool = True, seed: int = 0, **kw) -> SpeechLLaMA:
    torch.manual_seed(seed)
    model = SpeechLLaMA(_config(tied, **kw), encoder=TinyEncoder()).eval()
    with torch.no_grad():  # larger weights than the init, so positional mistakes show
        for p in model.decoder.parameters():
            p.mul_(10.0 if p.dim() > 1 else 1.0)
    return model


@pytest.fixture(scope="module")
def model() -> SpeechLLaMA:
    return _model()


# --- adapter and heads ------------------------------------------------------------------------


def test_adapter_stacks_frames_and_ignores_padding() -> None:
    adapter = Adapter(AdapterConfig(kind="linear", stack=2), d_in=3, d_out=5)
    x, lens = rand(2, 5, 3, seed=3), torch.tensor([5, 3])
    out, out_lens = adapter(x, lens)
    assert out.shape == (2, 3, 5) and out_lens.tolist() == [3, 2]
    # frame group j is the concatenation of frames 2j, 2j+1; the tail is zero-padded
    torch.testing.assert_close(out[0, 1], adapter.proj(torch.cat([x[0, 2], x[0, 3]])))
    torch.testing.assert_close(out[0, 2], adapter.proj(torch.cat([x[0, 4], torch.zeros(3)])))
    # the shorter row's padding (frames 3, 4) does not leak into its last group
    alone, _ = adapter(x[1:, :3], lens[1:])
    torch.testing.assert_close(out[1, :2], alone[0])
    mlp = Adapter(AdapterConfig(kind="mlp", stack=4, hidden=7), d_in=3, d_out=5)
    assert mlp(x, lens)[0].shape == (2, 2, 5) and mlp(x, lens)[1].tolist() == [2, 1]


def test_linear_head_tied_and_untied() -> None:
    tied = _model(tied=True)
    assert isinstance(tied.heads, LinearHead)
    assert tied.heads.proj.weight is tied.decoder.embed.weight
    hidden = rand(2, 3, 32, seed=4)
    logits = tied.heads(hidden)
    assert logits.shape == (2, 3, 1, VOCAB)
    torch.testing.assert_close(logits[:, :, 0], hidden @ tied.decoder.embed.weight.T)
    untied = _model(tied=False)
    assert untied.heads.proj.weight is not untied.decoder.embed.weight
    with pytest.raises(ValueError, match=r"unknown heads\.kind"):
        build_heads(_config().replace(heads=HeadsConfig(kind="nope")), tied.decoder.embed)
    with pytest.raises(ValueError, match="num_heads=2"):
        build_heads(_config().replace(heads=HeadsConfig(num_heads=2)), tied.decoder.embed)


# --- the assembled model ----------------------------------------------------------------------


def test_shapes_and_parameter_counts(model: SpeechLLaMA, batch: dict) -> None:
    feats, feat_lens = rand(3, 13, N_MELS, seed=5), torch.tensor([13, 9, 4])
    emb, emb_lens = model.encode(feats, feat_lens)
    assert emb.shape == (3, math.ceil(7 / 2), 32)
    assert emb_lens.tolist() == [4, 3, 1]  # encoder 7, 5, 2 frames -> stacked by 2
    logits, hidden = model(**batch, return_hidden=True)
    assert logits.shape == (3, 6, 1, VOCAB) and hidden.shape == (3, 6, 32)
    torch.testing.assert_close(model.heads(hidden), logits)
    assert model.ctc_logits(rand(3, 7, D_ENC, seed=6)).shape == (3, 7, VOCAB)

    counts = model.num_parameters()
    assert set(counts) == {"encoder", "adapter", "decoder", "heads", "ctc_head"}
    assert counts["heads"] == {"trainable": 0, "frozen": 0}  # tied: counted in the decoder
    assert sum(c["trainable"] for c in counts.values()) == sum(
        p.numel() for p in model.parameters()
    )
    model.encoder.requires_grad_(False)
    try:
        assert model.num_parameters()["encoder"] == {"trainable": 0, "frozen": 8 * 12 + 12}
    finally:
        model.encoder.requires_grad_(True)
    assert _model(tied=False, ctc=False).num_parameters()["heads"]["trainable"] == 32 * VOCAB


def test_forward_rows_do_not_depend_on_the_batch(model: SpeechLLaMA, batch: dict) -> None:
    with torch.no_grad():
        logits = model(**batch)
        for b in range(3):
            s, u = int(batch["audio_lens"][b]), int(batch["token_lens"][b])
            alone = model(
                batch["audio"][b : b + 1, :s], batch["audio_lens"][b : b + 1],
                batch["tokens"][b : b + 1, :u], batch["token_lens"][b : b + 1],
            )  # fmt: skip
            torch.testing.assert_close(logits[b, :u], alone[0], **TOL)


def test_prefill_and_steps_equal_teacher_forcing(model: SpeechLLaMA, batch: dict) -> None:
    with torch.no_grad():
        ref = model(**batch)
    tokens, lens = batch["tokens"], batch["token_lens"]
    cache = model.new_cache(3, 32)
    calls = model.decoder_calls
    first = model.prefill(batch["audio"], batch["audio_lens"], cache)
    assert first.shape == (3, 1, 1, VOCAB)
    assert cache.lengths.tolist() == [8, 5, 3]  # S_i + 1: BOS at position S_i
    torch.testing.assert_close(first[:, 0], ref[:, 0], **TOL)
    one = model.step(tokens[:, 1:2], cache)
    assert_valid_close(one, ref, lens, start=1)
    four = model.step(tokens[:, 2:6], cache)
    assert four.shape == (3, 4, 1, VOCAB)
    assert_valid_close(four, ref, lens, start=2)
    assert cache.lengths.tolist() == [13, 10, 8]
    assert model.decoder_calls - calls == 3


def test_bf16_decoder_takes_fp32_audio_and_returns_fp32_logits(batch: dict) -> None:
    """``set_decoder_dtype(bfloat16)`` (``bench --dtype``): the fp32 adapter's embeddings go in,
    a bf16 cache fills, fp32 logits come out, and they follow the fp32 model's closely."""
    ref_model, bf16 = _model(), _model().set_decoder_dtype(torch.bfloat16)
    assert bf16.decoder.embed.weight.dtype == torch.bfloat16 and bf16.adapter is not None
    out = {}
    for name, m in (("fp32", ref_model), ("bf16", bf16)):
        cache = m.new_cache(3, 32)
        with torch.no_grad():
            first = m.prefill(batch["audio"], batch["audio_lens"], cache)
            out[name] = torch.cat([first, m.step(batch["tokens"][:, 1:3], cache)], dim=1)
    assert cache.k.dtype == torch.bfloat16 and out["bf16"].dtype == torch.float32
    scale = out["fp32"].abs().max()
    assert (out["bf16"] - out["fp32"]).abs().max() < 0.05 * scale


def test_one_call_of_four_equals_four_calls_of_one(model: SpeechLLaMA, batch: dict) -> None:
    new = ids(3, 4, seed=7)
    caches = [model.new_cache(3, 32) for _ in range(2)]
    for cache in caches:
        model.prefill(batch["audio"], batch["audio_lens"], cache)
    together = model.step(new, caches[0])
    apart = torch.cat([model.step(new[:, j : j + 1], caches[1]) for j in range(4)], dim=1)
    torch.testing.assert_close(together, apart, **TOL)
    # a causal tree mask is the same as no mask
    cache = model.new_cache(3, 32)
    model.prefill(batch["audio"], batch["audio_lens"], cache)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    torch.testing.assert_close(model.step(new, cache, tree_mask=causal), together, **TOL)


def test_rollback_then_new_tokens_equals_fresh_sequence(model: SpeechLLaMA, batch: dict) -> None:
    assert_rollback_equals_fresh(model, batch, ids(3, 4, seed=8), ids(3, 2, seed=9))


def test_too_long_sequences_raise(batch: dict) -> None:
    model = _model(max_seq_len=10)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(**batch)  # 7 audio + 6 text positions
    cache = model.new_cache(3, 10)
    with pytest.raises(ValueError, match="KV cache"):
        model.prefill(torch.zeros(3, 10, 32), torch.tensor([10, 1, 1]), cache)
    with pytest.raises(ValueError, match="cache of 3"):
        model.prefill(batch["audio"][:2], batch["audio_lens"][:2], cache)
    model.prefill(batch["audio"], batch["audio_lens"], cache)  # longest: 8 positions
    with pytest.raises(ValueError, match="max_len=10"):
        model.step(ids(3, 3, seed=10), cache)


def test_pretrained_hf_decoder(tmp_path: Path) -> None:
    """With no audio, the model is the LLM: logits must equal transformers' on [BOS] y."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=45, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    config = with_pretrained_decoder(_config(), tmp_path)
    assert (config.decoder.vocab_size, config.decoder.max_seq_len) == (45, 64)
    model = SpeechLLaMA(config, encoder=TinyEncoder()).eval()
    with pytest.raises(ValueError, match="vocab_size"):
        _model().load_pretrained_decoder(tmp_path)
    model.load_pretrained_decoder(tmp_path)
    tokens = ids(2, 7, seed=11) % 45
    tokens[:, 0] = config.bos_id
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        ours = model(torch.zeros(2, 1, 32), torch.tensor([0, 0]), tokens, torch.tensor([7, 7]))
    torch.testing.assert_close(ours[:, :, 0], ref, **TOL)
