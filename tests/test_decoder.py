"""LLaMA decoder: equality with Hugging Face, and the static KV cache against full passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from speechllama.model.config import DecoderConfig
from speechllama.model.decoder import LlamaDecoder
from speechllama.model.hf_llama import HFCheckpointError, decoder_from_hf, load_hf_llama
from speechllama.model.kv_cache import KVCache

torch.set_num_threads(1)
TOL = dict(atol=1e-5, rtol=1e-5)

CFG = DecoderConfig(
    vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, rope_theta=500.0,
    max_seq_len=64,
)  # fmt: skip


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from the default init (norm gains included), so a mixed-up name, a wrong rope
    layout or a missing norm cannot hide behind near-identity layers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.3 * noise)


def _tokens(shape: tuple[int, ...], seed: int, vocab: int = CFG.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dec() -> LlamaDecoder:
    model = LlamaDecoder(CFG).eval()
    _randomise(model)
    return model


def _full(dec: LlamaDecoder, tokens: torch.Tensor) -> torch.Tensor:
    """Reference: one causal pass over whole sequences (B, T) -> hidden (B, T, d)."""
    with torch.no_grad():
        return dec.forward_train(dec.embed(tokens))


def _step(dec: LlamaDecoder, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Write tokens (B, k) right after each sequence's length, advance -> hidden (B, k, d)."""
    slots = cache.lengths[:, None] + torch.arange(tokens.shape[1])
    with torch.no_grad():
        hidden = dec.forward_cached(dec.embed(tokens), cache, slots)
    cache.lengths = cache.lengths + tokens.shape[1]
    return hidden


# --- equality with transformers' LlamaForCausalLM --------------------------------------------


def _save_hf(path: Path, tied: bool, sharded: bool = False) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 321.0},
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    _randomise(hf, seed=1)
    if tied:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    hf.save_pretrained(path, max_shard_size="20KB" if sharded else "1GB")
    assert (path / "model.safetensors.index.json").is_file() == sharded
    return hf


@pytest.mark.parametrize(("tied", "sharded"), [(True, False), (False, False), (False, True)])
def test_logits_match_hf_llama(tmp_path: Path, tied: bool, sharded: bool) -> None:
    hf = _save_hf(tmp_path, tied, sharded)
    cfg, state = load_hf_llama(tmp_path)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (4, 2, 321.0, tied)
    assert ("lm_head.weight" in state) == (not tied)
    dec, lm_head = decoder_from_hf(tmp_path)
    dec.eval()
    unembed = dec.embed.weight if lm_head is None else lm_head
    assert (lm_head is None) == tied

    tokens = _tokens((2, 11), seed=2, vocab=61)
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
    torch.testing.assert_close(_full(dec, tokens) @ unembed.T, ref, **TOL)
    # the same through the cache: 4 tokens, then 1, then the remaining 6
    cache = dec.new_cache(2, 32)
    hidden = torch.cat([_step(dec, cache, t) for t in tokens.split([4, 1, 6], dim=1)], dim=1)
    torch.testing.assert_close(hidden @ unembed.T, ref, **TOL)


def test_hf_config_with_top_level_rope_theta(tmp_path: Path) -> None:
    """Checkpoints written by transformers 4.x keep ``rope_theta`` at the top level."""
    _save_hf(tmp_path, tied=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_theta"] = raw.pop("rope_parameters")["rope_theta"]
    raw["rope_scaling"] = None
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_hf_llama(tmp_path)[0].rope_theta == 321.0


def test_hf_bad_directories_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(HFCheckpointError, match=r"config\.json"):
        load_hf_llama(tmp_path)
    _save_hf(tmp_path, tied=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "attention_bias": True}))
    with pytest.raises(HFCheckpointError, match="attention_bias"):
        load_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "intermediate_size": 64}))
    with pytest.raises(HFCheckpointError, match="shape"):
        load_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors"):
        load_hf_llama(tmp_path)


# --- the static KV cache ---------------------------------------------------------------------


def test_incremental_equals_full_pass(dec: LlamaDecoder) -> None:
    tokens = _tokens((2, 17), seed=3)
    ref = _full(dec, tokens)
    cache = dec.new_cache(2, 40)
    chunks = [5, 1, 1, 1, 3, 1, 4, 1]
    hidden = torch.cat([_step(dec, cache, t) for t in tokens.split(chunks, dim=1)], dim=1)
    torch.testing.assert_close(hidden, ref, **TOL)
    assert cache.lengths.tolist() == [17, 17]


def test_ragged_batch_equals_each_sequence_alone(dec: LlamaDecoder) -> None:
    """Sequences of different lengths share one cache; each must match its solo full pass,
    although the shorter one has stale scratch values in slots the longer one uses."""
    a, b = _tokens((1, 12), seed=4), _tokens((1, 12), seed=5)
    ref_a, ref_b = _full(dec, a), _full(dec, b)
    cache = dec.new_cache(2, 32)
    cache.k.normal_()  # scratch full of garbage: only the mask may keep it out
    cache.v.normal_()
    # prefill both with 8 positions, then keep 3 of b and 8 of a (ragged)
    _step(dec, cache, torch.cat([a[:, :8], b[:, :8]]))
    cache.truncate(torch.tensor([8, 3]))
    out = _step(dec, cache, torch.cat([a[:, 8:10], b[:, 3:5]]))
    torch.testing.assert_close(out[0], ref_a[0, 8:10], **TOL)
    torch.testing.assert_close(out[1], ref_b[0, 3:5], **TOL)
    out = _step(dec, cache, torch.cat([a[:, 10:11], b[:, 5:6]]))
    torch.testing.assert_close(out[0], ref_a[0, 10:11], **TOL)
    torch.testing.assert_close(out[1], ref_b[0, 5:6], **TOL)
    assert cache.lengths.tolist() == [11, 6]


def test_rollback_leaves_no_stale_influence(dec: LlamaDecoder) -> None:
    prefix, rejected, accepted = _tokens((1, 6), 6), _tokens((1, 4), 7), _tokens((1, 3), 8)
    cache = dec.new_cache(1, 32)
    _step(dec, cache, prefix)
    _step(dec, cache, rejected)  # slots 6..9 now hold rejected tokens
    cache.truncate(7)  # keep the first rejected token only
    kept = torch.cat([prefix, rejected[:, :1]], dim=1)
    out = _step(dec, cache, accepted[:, :1])  # overwrites slot 7; slots 8, 9 stay stale
    ref = _full(dec, torch.cat([kept, accepted], dim=1))
    torch.testing.assert_close(out[0], ref[0, 7:8], **TOL)
    out = _step(dec, cache, accepted[:, 1:])
    torch.testing.assert_close(out[0], ref[0, 8:10], **TOL)


def test_tree_mask_and_slot_compaction(dec: LlamaDecoder) -> None:
    """Candidates a, b (depth 0) and c after a (depth 1) in one call; then keep path a, c."""
    prefix, (a, b, c, d) = _tokens((1, 5), 9), _tokens((4,), 10).tolist()
    cache = dec.new_cache(1, 32)
    _step(dec, cache, prefix)
    tree = torch.tensor([[[1, 0, 0], [0, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    slots = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        x = dec.embed(torch.tensor([[a, b, c]]))
        out = dec.forward_cached(
            x, cache, slots, positions=torch.tensor([[5, 5, 6]]), tree_mask=tree
        )
    ref_ac = _full(dec, torch.cat([prefix, torch.tensor([[a, c, d]])], dim=1))
    ref_b = _full(dec, torch.cat([prefix, torch.tensor([[b]])], dim=1))
    torch.testing.assert_close(out[0, [0, 2]], ref_ac[0, [5, 6]], **TOL)
    torch.testing.assert_close(out[0, 1], ref_b[0, 5], **TOL)
    cache.lengths = cache.lengths + 3
    cache.copy_slots(torch.tensor([[5, 7]]), torch.tensor([[5, 6]]))
    cache.truncate(7)
    out = _step(dec, cache, torch.tensor([[d]]))
    torch.testing.assert_close(out[0, 0], ref_ac[0, 7], **TOL)


def test_reorder_selects_and_duplicates_sequences(dec: LlamaDecoder) -> None:
    tokens = _tokens((2, 6), 11)
    cache = dec.new_cache(2, 16)
    _step(dec, cache, tokens[:, :4])
    cache.truncate(torch.tensor([4, 2]))
    cache.reorder(torch.tensor([1, 1, 0]))
    assert cache.lengths.tolist() == [2, 2, 4] and cache.batch_size == 3
    nxt = torch.stack([tokens[1, 2:4], tokens[1, 2:4], tokens[0, 4:6]])
    out = _step(dec, cache, nxt)
    ref = _full(dec, tokens)
    torch.testing.assert_close(out[0], ref[1, 2:4], **TOL)
    torch.testing.assert_close(out[1], ref[1, 2:4], **TOL)
    torch.testing.assert_close(out[2], ref[0, 4:6], **TOL)


def test_cache_refuses_growth_and_overflow(dec: LlamaDecoder) -> None:
    cache = dec.new_cache(1, 8)
    _step(dec, cache, _tokens((1, 6), 12))
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(7)
    with pytest.raises(ValueError, match="max_len=8"):
        _step(dec, cache, _tokens((1, 3), 13))
    with pytest.raises(ValueError, match="max_len"):
        dec.new_cache(1, CFG.max_seq_len + 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        dec.forward_train(torch.zeros(1, CFG.max_seq_len + 1, CFG.d_model))


def test_dropout_only_in_training() -> None:
    dec = LlamaDecoder(CFG.__class__(**{**CFG.__dict__, "dropout": 0.5}))
    x = torch.randn(1, 6, CFG.d_model)
    dec.train()
    assert not torch.allclose(dec.forward_train(x), dec.forward_train(x))
    dec.eval()
    torch.testing.assert_close(dec.forward_train(x), dec.forward_train(x), atol=0, rtol=0)
