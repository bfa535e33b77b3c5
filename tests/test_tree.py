"""Tree verification decoding: the candidate tree (product, pruning, mask, ancestors), output
equal to greedy token for token in fp32 (batched, unbatched, ``latent`` and ``layer`` heads),
every call keeping exactly the longest path greedy agrees with (checked against a reference
built from greedy's output and the mask actually fed), a top-1 chain tree equal to ``verify``,
the KV cache after decoding equal to greedy's (no stale entry below any length), and fewer heads
than the tree asks for shrinking the tree instead of failing."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import fit, record_steps, run_decoding, summary

from speechllama.decoding import DecodingOptions, available_strategies
from speechllama.decoding.base import Decoded, max_tokens_for
from speechllama.decoding.tree import TreeDecoder
from speechllama.decoding.tree_shape import (
    TreeShapeError,
    build_tree,
    cartesian_paths,
    tree_from_paths,
)
from speechllama.model.config import HeadsConfig, preset
from speechllama.model.speechllama import SpeechLLaMA

torch.set_num_threads(1)
VOCAB, EOS, PAD = 48, 2, 0
LENS = [8, 5, 7, 3, 6, 8]
DURATIONS = [1.0, 0.4, 1.0, 0.2, 1.0, 0.6]  # length limits 28, 21, 28, 19, 28, 24


# --- the tree -----------------------------------------------------------------------------------


def test_product_tree_nodes_parents_mask_and_ancestors() -> None:
    tree = build_tree((3, 2, 1))
    assert tree.num_nodes == 3 + 3 * 2 + 3 * 2 * 1 and tree.width == 16
    assert tree.depth == 3 and tree.widths == (3, 2, 1)
    assert set(tree.paths[1:]) == set(cartesian_paths((3, 2, 1)))
    assert list(tree.depths) == sorted(tree.depths)  # breadth first
    mask, anc = tree.mask(), tree.ancestors()
    assert mask.shape == (16, 16) and anc.shape == (16, 4)
    for i, p in enumerate(tree.paths):
        parent = tree.parents[i]
        assert parent < i or i == 0
        assert tree.paths[parent] == p[:-1] or i == 0
        # row i sees exactly the nodes whose paths are prefixes of its own (root, itself)
        seen = {j for j, q in enumerate(tree.paths) if p[: len(q)] == q}
        assert set(mask[i].nonzero().flatten().tolist()) == seen
        assert int(mask[i].sum()) - 1 == len(p)  # the rope offset the model derives
        assert [tree.paths[j] for j in anc[i, : len(p) + 1].tolist()] == [
            p[:d] for d in range(len(p) + 1)
        ]
        assert anc[i, len(p) + 1 :].tolist() == list(range(len(p) + 1, 4))  # pads copy in place


def test_pruning_keeps_the_smallest_rank_sums_and_a_tree() -> None:
    full = set(cartesian_paths((4, 4, 4)))
    pruned = build_tree((4, 4, 4), max_nodes=10)
    kept = set(pruned.paths[1:])
    assert len(kept) == 10 and kept <= full
    assert {(0,), (0, 0), (0, 0, 0)} <= kept  # the top-1 chain comes first
    assert all(p[:-1] in kept for p in kept if len(p) > 1)
    assert max(sum(p) for p in kept) <= min(sum(p) for p in full - kept)
    huge = build_tree((50,) * 8, max_nodes=64)  # 50^8 paths: must not be enumerated
    assert huge.num_nodes == 64 and huge.depth == 8
    assert build_tree(()).paths == ((),) and build_tree(()).widths == ()


def test_medusa_style_paths_and_bad_shapes() -> None:
    tree = tree_from_paths([(1,), (0, 0), (0,), (0, 1), (0, 0, 0)])
    assert tree.paths == ((), (0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    assert tree.parents == (0, 0, 0, 1, 1, 3)
    with pytest.raises(TreeShapeError, match="without its parent"):
        tree_from_paths([(0,), (1, 0)])
    for bad in [(0,), (2, -1), (1.5,)]:
        with pytest.raises(ValueError, match="positive integers"):
            TreeDecoder(DecodingOptions(strategy="tree", tree=bad))  # type: ignore[arg-type]
    wide = TreeDecoder(DecodingOptions(strategy="tree", tree=(20, 20)))
    assert wide.shape.num_nodes == DecodingOptions().tree_max_nodes == 64
    assert wide.lookahead == 64 + 1
    for cap in (1, 10, 500):
        capped = TreeDecoder(DecodingOptions(strategy="tree", tree=(20, 20), tree_max_nodes=cap))
        assert capped.shape.num_nodes == min(cap, 20 + 20 * 20)
        assert capped.lookahead == capped.shape.num_nodes + 1
    with pytest.raises(ValueError, match="tree_max_nodes=0 must be at least 1"):
        TreeDecoder(DecodingOptions(strategy="tree", tree_max_nodes=0))


# --- a model whose heads are half trained -------------------------------------------------------


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Audio embeddings (6, 8, 64) zero past LENS, and labels (6, 24) = y EOS."""
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(len(LENS), max(LENS), 64, generator=g)
    for b, n in enumerate(LENS):
        audio[b, n:] = 0
    labels = torch.randint(3, VOCAB, (len(LENS), 24), generator=g)
    labels[:, -1] = EOS
    return audio, torch.tensor(LENS), labels


@functools.cache
def _model(kind: str, heads: int = 4) -> SpeechLLaMA:
    """The tiny preset with ``heads`` heads of ``kind``, trained 20 Adam steps on six random
    utterances: enough that heads 2..4 are right often but far from always, so every call
    mixes accepted and rejected candidates."""
    torch.manual_seed(0)
    model = SpeechLLaMA(preset("tiny", VOCAB).replace(heads=HeadsConfig(kind, heads))).train()
    audio, lens, labels = _data()
    return fit(model, audio, lens, labels, steps=20)


def _decode(
    model: SpeechLLaMA, rows: list[int] | None = None, compact: bool = True, **opts
) -> list[Decoded]:
    audio, lens, _ = _data()
    if rows is not None:
        audio, lens = audio[rows, : max(LENS[r] for r in rows)], lens[rows]
    durations = [DURATIONS[r] for r in rows] if rows is not None else DURATIONS
    return run_decoding(model, audio, lens, durations, compact, eos_id=EOS, **opts)


def _record_caches(model: SpeechLLaMA, monkeypatch: pytest.MonkeyPatch) -> list:
    """Spy on ``model.new_cache``: every cache it builds, in order (the prefill's first)."""
    caches = []
    real_new_cache = model.new_cache

    def capture(*args, **kwargs):
        caches.append(real_new_cache(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(model, "new_cache", capture)
    return caches


def _per_call(out: list[Decoded]) -> float:
    return sum(len(d.tokens) for d in out) / sum(d.decoder_calls for d in out)


# --- lossless --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["latent", "layer"])
def test_tree_equals_greedy_batched_and_unbatched(kind: str) -> None:
    model = _model(kind)
    greedy = _decode(model, strategy="greedy")
    tree = _decode(model, strategy="tree")
    lengths = [len(d.tokens) for d in greedy]
    limits = [max_tokens_for(s, DecodingOptions()) for s in DURATIONS]
    assert len(set(lengths)) > 1  # ragged, some by EOS and some by the limit
    assert any(n < lim for n, lim in zip(lengths, limits, strict=True))
    assert any(n == lim for n, lim in zip(lengths, limits, strict=True))
    assert [d.tokens for d in tree] == [d.tokens for d in greedy]
    assert sum(d.decoder_calls for d in tree) < sum(d.decoder_calls for d in greedy)
    for b in range(len(LENS)):
        alone = _decode(model, [b], strategy="tree")[0]
        assert alone.tokens == tree[b].tokens
        assert alone.decoder_calls == tree[b].decoder_calls
        assert alone.accepted_per_call == tree[b].accepted_per_call


def test_each_call_keeps_the_longest_path_greedy_agrees_with(monkeypatch) -> None:
    """Reference for every call and row: walk greedy's own continuation through the tree that
    was fed (paths read off the fed mask), keep the deepest node on it plus the bonus token;
    the cache must grow by exactly that (clipped at the length limit), finished rows by 0."""
    model = _model("latent")
    greedy = _decode(model, strategy="greedy")
    calls = record_steps(  # fed, mask, lengths
        model, monkeypatch,
        lambda tokens, cache, tree_mask, _: (
            tokens.clone(), tree_mask.clone(), cache.lengths.clone()
        ),
    )  # fmt: skip
    caches = _record_caches(model, monkeypatch)
    decoded = _decode(model, strategy="tree", compact=False)  # rows keep their index
    ends = [c[2] for c in calls[1:]] + [caches[0].lengths]  # lengths after each call
    shape = build_tree((3, 2, 1))
    kept_paths: list[tuple[int, ...]] = []
    for b, g in enumerate(greedy):
        limit = max_tokens_for(DURATIONS[b], DecodingOptions())
        full = [*g.tokens, EOS] if len(g.tokens) < limit else list(g.tokens)
        pos = 1  # the prefill emitted full[0]
        for (fed, mask, before), after in zip(calls, ends, strict=True):
            grown = int(after[b] - before[b])
            if pos >= limit or EOS in full[:pos]:
                assert grown == 0, "a finished row grew"
                continue
            assert mask.shape == (16, 16) and torch.equal(mask, shape.mask())
            assert int(fed[b, 0]) == full[pos - 1]  # the root is the last kept token
            best, best_path = 0, ()
            for i in range(1, mask.shape[0]):
                path = mask[i].nonzero().flatten().tolist()[1:]  # ancestors then i, by depth
                on_greedy = [int(fed[b, j]) for j in path] == full[pos : pos + len(path)]
                if on_greedy and len(path) > best:
                    best, best_path = len(path), shape.paths[i]
            kept_paths.append(best_path)
            if EOS in full[pos : pos + best]:  # past EOS greedy says nothing: the model's
                assert best + 1 <= grown <= min(4, limit - pos)  # own guesses may go on
            else:
                assert grown == min(best + 1, limit - pos), (b, pos)
            pos += best + 1
        assert decoded[b].tokens == g.tokens
    depths = [len(p) for p in kept_paths]
    assert 0 in depths and 3 in depths and (1 in depths or 2 in depths)  # rejected and accepted
    assert any(any(p) for p in kept_paths), "no call kept a candidate beyond the top-1 chain"


def test_top1_chain_is_verify_and_the_tree_keeps_more_per_call() -> None:
    model = _model("latent")
    chain = _decode(model, strategy="tree", tree=(1, 1, 1))
    tree = _decode(model, strategy="tree", tree=(3, 2, 1))
    assert [d.tokens for d in chain] == [d.tokens for d in tree]
    assert _per_call(tree) > _per_call(chain) > 1.0
    if "verify" not in available_strategies():
        pytest.skip("verify.py has not landed: the chain was compared with the wider tree only")
    verify = _decode(model, strategy="verify", verify="exact")
    assert [d.accepted_per_call for d in chain] == [d.accepted_per_call for d in verify]
    assert [d.decoder_calls for d in chain] == [d.decoder_calls for d in verify]


# --- cache, fewer heads ----------------------------------------------------------------------


@pytest.mark.parametrize("draft", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["latent", "layer"])
def test_cache_after_tree_decoding_equals_greedys(kind: str, draft: float, monkeypatch) -> None:
    """Every slot below each row's length (trunk layers and ``layer`` heads' cache layers)
    holds what greedy's transcript puts there: the kept path was compacted, the rest rolled
    back. Greedy computes head 1 only (its cache has no head layers), so the reference is one
    cached all-heads call over [audio][BOS] + greedy's tokens. ``draft``: pruned trees."""
    model = _model(kind)
    real_new_cache = model.new_cache
    caches = _record_caches(model, monkeypatch)
    # no compaction: every row's cache is still there at the end
    greedy = _decode(model, strategy="greedy")
    tree = _decode(model, strategy="tree", compact=False, draft_threshold=draft)
    got = caches[1]
    audio, lens, _ = _data()
    width = max(len(d.tokens) for d in greedy)
    text = torch.full((len(LENS), width), PAD)
    for b, d in enumerate(greedy):
        text[b, : len(d.tokens)] = torch.tensor(d.tokens)
    ref = real_new_cache(len(LENS), max(LENS) + 1 + width)
    with torch.inference_mode():
        model.prefill(audio, lens, ref)
        model.step(text, ref)
    assert got.k.shape[0] == model.config.decoder.n_layers + model.heads.cache_layers
    for b, n in enumerate(LENS):
        # [audio][BOS] + the transcript but its last token (not fed), at least
        assert int(got.lengths[b]) >= n + len(tree[b].tokens)
        common = min(n + 1 + len(greedy[b].tokens), int(got.lengths[b]))
        assert common >= n + len(greedy[b].tokens)
        torch.testing.assert_close(got.k[:, b, :, :common], ref.k[:, b, :, :common])
        torch.testing.assert_close(got.v[:, b, :, :common], ref.v[:, b, :, :common])


def test_fewer_heads_shrink_the_tree(monkeypatch) -> None:
    model = _model("latent")
    greedy = _decode(model, strategy="greedy")

    def width(tokens, cache, tree_mask, num_heads) -> int:
        assert num_heads == 2
        return tokens.shape[1]

    widths = record_steps(model, monkeypatch, width)
    two = _decode(model, strategy="tree", num_heads=2)  # heads 1-2: the tree is (3,)
    assert set(widths) == {4}
    assert [d.tokens for d in two] == [d.tokens for d in greedy]
    monkeypatch.undo()
    single = _model("linear", heads=1)  # one head: no candidates, one token per call
    assert [d.accepted_per_call for d in _decode(single, strategy="tree")] == [
        d.accepted_per_call for d in _decode(single, strategy="greedy")
    ]


def test_max_nodes_caps_every_call(monkeypatch) -> None:
    model = _model("latent")
    greedy = _decode(model, strategy="greedy")
    widths = record_steps(model, monkeypatch, lambda tokens, *_: tokens.shape[1])
    out = _decode(model, strategy="tree", tree=(3, 2, 1), tree_max_nodes=5)
    assert set(widths) == {6}  # root + the 5 smallest-rank-sum candidates
    assert [d.tokens for d in out] == [d.tokens for d in greedy]


# --- command line ----------------------------------------------------------------------------


COMMANDS = [["transcribe", "a.wav"], ["evaluate", "m.jsonl", "--out", "o"]]


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_tree_flags(command: list[str], capsys) -> None:
    from speechllama.cli import build_parser
    from speechllama.cli.transcribe import decoding_options

    parser = build_parser()
    default = decoding_options(parser.parse_args([*command, "--decoding", "tree"]))
    assert (default.tree, default.tree_max_nodes) == ((3, 2, 1), 64)
    for flag in ("4-2", "4,2"):
        args = parser.parse_args(
            [*command, "--decoding", "tree", "--tree", flag, "--tree-max-nodes", "6"]
        )
        options = decoding_options(args)
        assert (options.strategy, options.tree, options.tree_max_nodes) == ("tree", (4, 2), 6)
        assert TreeDecoder(options).shape.num_nodes == 6
    for bad in ("3-0", "x", ""):
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--tree", bad])
        assert "expected candidates per depth like 3-2-1" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["latent", "layer"])
def test_compaction_changes_no_result(kind: str, monkeypatch) -> None:
    """Dropping finished rows (cache rows, ``layer`` heads' cache layers, last tokens and
    proposals with them) leaves every row's tokens, calls and histogram as they were."""
    model = _model(kind)
    full = _decode(model, strategy="tree", compact=False)
    widths = record_steps(model, monkeypatch, lambda tokens, *_: tokens.shape[0])
    compacted = _decode(model, strategy="tree")
    assert summary(compacted) == summary(full)
    assert widths[0] == len(LENS) and widths[-1] < len(LENS)
