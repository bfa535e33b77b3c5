"""Decode-path speed-ups: packed linears, grouped-query attention without copies, cache reorder."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from speechllama.model import packed
from speechllama.model.config import DecoderConfig
from speechllama.model.decoder import KVCache, LlamaDecoder
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
def test_one_row_packing_is_chosen_by_the_decoders_weight_bytes(monkeypatch) -> None:
    ws = _weights()
    x = torch.randn(1, 9, 24, generator=torch.Generator().manual_seed(3))
    p = PackedLinears()
    with torch.inference_mode():
        every = p.linear(x, "w", ws)
        p.one_row = True  # one row now takes the packed kernel: the same bits as in a block
        assert torch.equal(p.linear(x[:, :1], "w", ws), every[:, :1])
    assert copy.deepcopy(p).one_row
    from speechllama.model.config import preset
    from speechllama.model.speechllama import SpeechLLaMA

    cfg = preset("tiny", 64)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # threads spin: pack every call
    assert all(q.one_row for q in SpeechLLaMA(cfg)._packed())
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # threads sleep: MKL's gemv for small ones
    assert not any(q.one_row for q in SpeechLLaMA(cfg)._packed())  # kilobytes: MKL at one row
    monkeypatch.setattr("speechllama.model.speechllama.PACK_ALL_ONE_ROW_BYTES", 1)
    stores = SpeechLLaMA(cfg)._packed()
    assert stores and all(q.one_row for q in stores)


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
