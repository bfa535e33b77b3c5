"""Decode-path speed-ups: packed linears, grouped-query attention without copies, cache reorder."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from speechllama.model import packed
from speechllama.model.config import DecoderConfig
from speechllama.model.decoder import LlamaDecoder
from speechllama.model.kv_cache import KVCache
from speechllama.model.packed import PackedLinears

torch.set_num_threads(1)
needs_onednn = pytest.mark.skipif(not packed._AVAILABLE, reason="no oneDNN in this torch")


def _weights(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 24, generator=g) for n in (24, 8, 8))


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 5, 40])
def test_packed_linear_is_the_concatenated_linear(rows: int) -> None:
    ws = _weights()
    x = torch.randn(1, rows, 24, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = PackedLinears().linear(x, "qkv", ws)
    torch.testing.assert_close(got, F.linear(x, torch.cat(ws)), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_packed_rows_do_not_depend_on_the_row_count() -> None:
    ws = _weights()
    x = torch.randn(1, 9, 24, generator=torch.Generator().manual_seed(2))
    p = PackedLinears()
    with torch.inference_mode():
        every = p.linear(x, "w", ws)
        for rows in range(2, 9):
            assert torch.equal(p.linear(x[:, :rows], "w", ws), every[:, :rows])


@needs_onednn
def test_policy_modes_pick_the_kernel(monkeypatch) -> None:
    ws = _weights()
    x = torch.randn(1, 9, 24, generator=torch.Generator().manual_seed(3))
    p = PackedLinears(packed.PackPolicy("always"))
    with torch.inference_mode():
        every = p.linear(x, "w", ws)
        assert torch.equal(p.linear(x[:, :1], "w", ws), every[:, :1])  # one row, same bits
        p.policy.mode = "never"  # MKL on the concatenated matrices
        got = p.linear(x, "w", ws)
    assert torch.equal(got, F.linear(x, torch.cat(ws)))
    monkeypatch.setenv(packed.PACK_ENV, "NEVER")
    assert packed.PackPolicy().mode == "never"
    monkeypatch.setenv(packed.PACK_ENV, "sometimes")
    with pytest.raises(ValueError, match="SPEECHLLAMA_PACK='sometimes'"):
        packed.PackPolicy()


def test_row_buckets_and_call_sizes() -> None:
    from speechllama.model.pack_tuning import call_sizes

    assert [packed.row_bucket(n) for n in (1, 5, 16, 17, 32, 33, 64)] == [1, 5, 16, 32, 32, 64, 64]
    assert call_sizes(1, 5) == [1, 2, 3, 4, 5]
    assert call_sizes(16, 8) == [*range(1, 17), 32, 64]  # 128 rows: 65 and more take MKL


@needs_onednn
def test_a_model_measures_each_call_size_once_and_copies_share_one_policy(monkeypatch) -> None:
    from speechllama.model.config import HeadsConfig, preset
    from speechllama.model.heads import expand_heads
    from speechllama.model.speechllama import SpeechLLaMA

    monkeypatch.delenv(packed.PACK_ENV, raising=False)
    model = SpeechLLaMA(preset("tiny", 64)).eval()
    policy = model.pack_policy
    assert {q.policy for q in model._packed()} == {policy}
    dtype, threads = torch.float32, torch.get_num_threads()
    with torch.inference_mode():
        cache = model.decoder.new_cache(1, 40)
        model.prefill(torch.randn(1, 20, 64), torch.tensor([20]), cache)
        model.step(torch.tensor([[3, 4, 5]]), cache)
    assert set(policy.choices) == {(dtype, threads, 32), (dtype, threads, 3)}  # 21 rows: 32
    model.tune_packing([1, 3, 200])  # 200 rows: no measurement, MKL
    assert set(policy.choices) == {(dtype, threads, n) for n in (1, 3, 32)}
    assert not policy.packs(200, dtype) and policy.measured(200, dtype)
    twin = copy.deepcopy(model)
    shared = {q.policy for q in twin._packed()}
    assert len(shared) == 1 and shared != {policy} and twin.pack_policy in shared
    assert twin.pack_policy.choices == policy.choices
    wider = expand_heads(model, HeadsConfig(kind="latent", num_heads=3))
    assert {q.policy for q in wider._packed()} == {wider.pack_policy}


@needs_onednn
def test_packed_weights_follow_in_place_updates_and_are_not_deep_copied() -> None:
    w = torch.nn.Parameter(torch.randn(16, 24))
    x = torch.randn(3, 24)
    p = PackedLinears()
    with torch.no_grad():
        first = p.linear(x, "w", (w,))
        w.mul_(2.0)  # what an optimizer step or load_state_dict does
        torch.testing.assert_close(p.linear(x, "w", (w,)), 2 * first, atol=1e-5, rtol=1e-5)
    assert copy.deepcopy(p)._store == {}


def test_with_gradients_the_modules_own_linear_is_used() -> None:
    w = torch.nn.Parameter(torch.randn(16, 24))
    x = torch.randn(3, 24)
    out = PackedLinears().linear(x, "w", (w,))
    out.sum().backward()  # the packed op has no backward: this would fail through it
    assert torch.equal(w.grad, x.sum(0).expand(16, 24))


def _cache(lengths: list[int]) -> KVCache:
    cache = KVCache(2, len(lengths), 1, 12, 4)
    cache.k.copy_(torch.randn(cache.k.shape))
    cache.v.copy_(torch.randn(cache.v.shape))
    cache.lengths = torch.tensor(lengths)
    return cache


def test_reorder_copies_the_rows_history_and_leaves_zeros_beyond_the_longest() -> None:
    cache = _cache([5, 3, 7])
    old_k, old_v = cache.k.clone(), cache.v.clone()
    shallow = copy.copy(cache)
    cache.reorder(torch.tensor([2, 0, 0, 1]))
    assert cache.lengths.tolist() == [7, 5, 5, 3]
    for new, old in enumerate([2, 0, 0, 1]):
        assert torch.equal(cache.k[:, new, :, :7], old_k[:, old, :, :7])
        assert torch.equal(cache.v[:, new, :, :7], old_v[:, old, :, :7])
    assert not cache.k[:, :, :, 7:].any() and not cache.v[:, :, :, 7:].any()
    assert torch.equal(shallow.k, old_k)  # new tensors: a shallow copy keeps its rows


def test_grouped_query_attention_matches_repeated_keys_values() -> None:
    """The cached path lays q out as (B, G, r·T, D) instead of repeating k/v: same outputs as
    the teacher-forced pass, which still repeats them."""
    cfg = DecoderConfig(vocab_size=40, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                        d_ff=64, max_seq_len=32)  # fmt: skip
    torch.manual_seed(0)
    dec = LlamaDecoder(cfg).eval()
    tokens = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        ref = dec.forward_train(dec.embed(tokens))
        cache = dec.new_cache(2, 16)
        got = []
        for a, b in [(0, 6), (6, 7), (7, 11)]:
            slots = torch.arange(a, b).expand(2, -1)
            got.append(dec.forward_cached(dec.embed(tokens[:, a:b]), cache, slots))
            cache.lengths = torch.full((2,), b)
    torch.testing.assert_close(torch.cat(got, 1), ref, atol=1e-5, rtol=1e-5)
