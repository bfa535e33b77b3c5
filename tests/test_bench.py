"""``speechllama bench``: method parsing, the JSON rows (keys, one per method that ran, greedy
speed-up 1.0), the HF peer reproducing our greedy token for token (proof of the weight
mapping, also checked directly on logits), interleaved timing order, skips with notes, bad
audio, the plot file and --help."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
import torch
from test_transcribe import SENTENCES, write_wav

from speechllama import load_model
from speechllama.bench import _timed, run_bench
from speechllama.bench_methods import EncodedBatch, Output, _skip_reason, parse_methods
from speechllama.checkpoint import save_checkpoint
from speechllama.cli import main
from speechllama.data.manifest import load_manifest
from speechllama.decoding import DecodingOptions, available_strategies
from speechllama.evaluate import evaluate_manifest
from speechllama.model.compiled import compile_available
from speechllama.model.config import HeadsConfig, preset
from speechllama.model.heads import expand_heads
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.text import train_tokenizer

torch.set_num_threads(1)

REQUIRED = {"method", "wer", "calls_per_utt", "tokens_per_call", "decoder_seconds", "speedup",
            "rtf", "encoder_seconds", "encoder_rtf", "decoder_rtf", "identical_to_greedy",
            "batch_size", "utterances"}  # fmt: skip
# (text, seconds, wav seed): the last one's greedy transcript ends in EOS
UTTERANCES = [("the quick brown fox", 0.5, 0), ("a stitch in time", 0.3, 1),
              ("better late than never", 0.6, 2), ("all that glitters", 1.2, 4)]  # fmt: skip


def make_bench_checkpoint(root: Path) -> Path:
    """A random ``tiny`` model whose greedy output varies with the audio and sometimes ends in
    EOS, so that matching token sequences mean something. (With tied embeddings and N(0, 0.02)
    layers a random model just repeats its input token: the residual stream is the embedding.)
    Untied output layer, decoder layer weights scaled by 10."""
    tok = train_tokenizer(SENTENCES, root / "tok" / "tokenizer.model", vocab_size=40)
    cfg = preset("tiny", tok.vocab_size)
    cfg = cfg.replace(decoder=dataclasses.replace(cfg.decoder, tie_embeddings=False))
    torch.manual_seed(0)
    model = SpeechLLaMA(cfg).eval()
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if name.startswith("layers.") and p.dim() == 2:
                p.mul_(10.0)
    return save_checkpoint(model, tok, root / "ckpt", meta={"note": "random weights for tests"})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_bench_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def ckpt_k3(ckpt, tmp_path_factory) -> Path:
    """The same trunk with K = 3 latent heads; head 1's map is perturbed away from the
    identity, so ``lm_head`` must be U·A_1, not the un-embedding U."""
    model = load_model(ckpt)
    torch.manual_seed(1)
    k3 = expand_heads(model.model, HeadsConfig(kind="latent", num_heads=3))
    with torch.no_grad():
        k3.heads.maps.add_(0.05 * torch.randn_like(k3.heads.maps))
    return save_checkpoint(k3, model.tokenizer, tmp_path_factory.mktemp("k3") / "ckpt", meta={})


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio")
    rows = []
    for i, (text, secs, seed) in enumerate(UTTERANCES):
        wav = write_wav(root / f"u{i}.wav", secs, seed=seed)
        rows.append({"audio_filepath": str(wav), "text": text, "duration": secs})
    path = root / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_parse_methods():
    base = DecodingOptions(batch_size=4)
    got = parse_methods(
        "threshold@0.8,verify-topk@2, tree@3-1,hf-prompt-lookup,greedy,tree@3-1", base
    )
    assert [m.name for m in got] == ["greedy", "threshold@0.8", "verify-topk@2", "tree@3-1",
                                     "hf-prompt-lookup"]  # fmt: skip
    greedy, thr, topk, tree, lookup = got
    assert greedy.options.strategy == "greedy" and not greedy.multi_token
    assert (thr.options.strategy, thr.options.threshold, thr.multi_token) == (
        "threshold",
        0.8,
        True,
    )
    assert (topk.options.verify, topk.options.topk) == ("topk", 2)
    assert tree.options.tree == (3, 1)
    assert lookup.family == "hf" and lookup.prompt_lookup == 3 and lookup.options.batch_size == 1
    assert all(m.options.batch_size == 4 for m in got[:4])
    assert [m.name for m in parse_methods("verify-exact", base)] == ["greedy", "verify-exact"]
    both = parse_methods("greedy+compiled,verify-exact+compiled,verify-exact", base)
    assert [(m.name, m.compiled) for m in both] == [
        ("greedy", False), ("greedy+compiled", True), ("verify-exact+compiled", True),
        ("verify-exact", False)]  # fmt: skip
    assert both[2].options == both[3].options
    # int8 weights would be traced as their fp32 originals: a compiled method is skipped
    assert _skip_reason(both[0], 1, int8=True) is None
    if compile_available() is None:
        assert "int8" in (_skip_reason(both[1], 1, int8=True) or "")
        assert _skip_reason(both[1], 1, int8=False) is None
    bad_ones = ("nope", "threshold", "threshold@x", "threshold@1.5", "greedy@2", "tree@3-0",
                "hf-generate+compiled", "nope+compiled")  # fmt: skip
    for bad in bad_ones:
        with pytest.raises(ValueError, match="method"):
            parse_methods(bad, base)


def test_cli_table_json_and_plot(ckpt, manifest, tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "rows.json", tmp_path / "plot.png"
    methods = "greedy,hf-generate,hf-prompt-lookup,verify-exact,threshold@0.8"
    code = main(["bench", "--manifest", str(manifest), "--model", str(ckpt), "--threads", "1",
                 "--methods", methods, "--json", str(out), "--plot", str(png)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out.read_text())
    # K = 1: the multi-token methods are skipped with a note, every other method has one row
    assert [r["method"] for r in rows] == ["greedy", "hf-generate", "hf-prompt-lookup"]
    assert "skipped verify-exact, threshold@0.8: needs K > 1" in printed
    assert f"torch {torch.__version__}" in printed and "1 threads" in printed
    for r in rows:
        assert set(r) >= REQUIRED
        assert r["utterances"] == 4 and r["batch_size"] == 1
        assert r["audio_seconds"] == pytest.approx(2.6)
        assert r["rtf"] == pytest.approx((r["encoder_seconds"] + r["decoder_seconds"]) / 2.6)
        assert r["rtf"] == pytest.approx(r["encoder_rtf"] + r["decoder_rtf"])
        assert r["method"] in printed
    greedy, hf, lookup = rows
    assert greedy["speedup"] == 1.0 and greedy["identical_to_greedy"] == 1.0
    assert lookup["speedup"] == pytest.approx(greedy["decoder_seconds"] / lookup["decoder_seconds"])
    # the same decoder through transformers: same tokens, one forward pass per generated token
    assert hf["identical_to_greedy"] == 1.0 and lookup["identical_to_greedy"] == 1.0
    assert hf["calls_per_utt"] == greedy["calls_per_utt"] and hf["wer"] == greedy["wer"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the greedy transcripts are varied and some end in EOS, so "identical" is a real test
    results = load_model(ckpt).transcribe([u.audio_filepath for u in load_manifest(manifest)])
    assert len({t for r in results for t in r.tokens}) >= 8
    assert any(r.decoder_calls == len(r.tokens) + 1 for r in results)
    # greedy's WER and calls are what `evaluate` measures
    summary = evaluate_manifest(load_model(ckpt), manifest, DecodingOptions(batch_size=1))
    assert greedy["wer"] == pytest.approx(summary["wer"])
    assert greedy["calls_per_utt"] == pytest.approx(summary["calls_per_utt"])
    assert greedy["tokens_per_call"] == pytest.approx(summary["tokens_per_call"])


@torch.no_grad()
def test_hf_llama_logits_equal_ours(ckpt_k3):
    pytest.importorskip("transformers")
    from speechllama.bench_hf import to_hf_llama

    model = load_model(ckpt_k3).model
    hf = to_hf_llama(model)
    x = torch.randn(2, 7, model.config.decoder.d_model)
    ours = model.heads(model.decoder.forward_train(x), num_heads=1)[:, :, 0]  # (B, T, V)
    theirs = hf(inputs_embeds=x).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(hf.lm_head.weight, model.heads.proj.weight)  # U·A_1, not U


def test_batched_repeats_and_multi_token_methods(ckpt_k3, manifest):
    pytest.importorskip("transformers")
    model = load_model(ckpt_k3)
    options = DecodingOptions(batch_size=2)
    wanted = ["greedy", "hf-generate"]
    if "verify" in available_strategies():
        wanted.append("verify-exact")  # lossless: must reproduce greedy
    report = run_bench(model, load_manifest(manifest), parse_methods(wanted, options), options,
                       repeats=3)  # fmt: skip
    rows = {r["method"]: r for r in report.rows}
    assert list(rows) == wanted
    for r in rows.values():
        assert len(r["decoder_seconds_runs"]) == 3
        assert r["decoder_seconds"] == statistics.median(r["decoder_seconds_runs"])
        assert r["identical_to_greedy"] == 1.0
    assert rows["greedy"]["batch_size"] == 2 and rows["hf-generate"]["batch_size"] == 1
    assert any("batch 1" in n for n in report.notes)
    assert report.header["heads"] == 3 and report.header["batch_size"] == 2


def test_uninstalled_strategies_are_skipped(ckpt_k3, manifest, monkeypatch):
    import speechllama.bench_methods as bm

    monkeypatch.setattr(bm, "available_strategies", lambda: ["greedy"])
    model = load_model(ckpt_k3)
    options = DecodingOptions(batch_size=1)
    utts = load_manifest(manifest)[:1]
    report = run_bench(model, utts, parse_methods("threshold@0.8,beam@2", options), options)
    assert [r["method"] for r in report.rows] == ["greedy"]
    assert report.notes == ("skipped threshold@0.8: strategy 'threshold' is not installed",
                            "skipped beam@2: strategy 'beam' is not installed")  # fmt: skip


class _Recorder:
    """A stand-in runner that records when it ran."""

    batch_size = 1
    lookahead = 1

    def __init__(self, name: str, log: list[tuple[str, int]]) -> None:
        self.name, self.log = name, log

    def run(self, batch: EncodedBatch) -> tuple[list[Output], float]:
        self.log.append((self.name, batch.indices[0]))
        return [Output((1, 2), 2) for _ in batch.indices], 0.5


def test_methods_take_turns_in_rotated_order():
    log: list[tuple[str, int]] = []
    runners = {n: _Recorder(n, log) for n in ("a", "b", "c")}
    one = torch.zeros(1, 2, 4)
    batches = [EncodedBatch((i,), one, torch.tensor([2]), (1.0,), (5,)) for i in range(3)]
    seconds, outputs = _timed(runners, batches, repeats=2, notes=[])
    assert log[:3] == [("a", 0), ("b", 0), ("c", 0)]  # warm-up on the first utterance
    timed = log[3:]
    firsts = [timed[i][0] for i in range(0, len(timed), 3)]
    assert firsts == ["a", "b", "c", "b", "c", "a"]  # who goes first rotates batch by batch
    assert all(sorted(n for n, _ in timed[i : i + 3]) == ["a", "b", "c"] for i in range(0, 18, 3))
    assert seconds == {n: [1.5, 1.5] for n in "abc"}
    assert outputs["a"] == {i: Output((1, 2), 2) for i in range(3)}


def test_bad_audio_is_reported_and_the_rest_benched(ckpt, manifest, tmp_path, capsys):
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio\n")
    rows = manifest.read_text().splitlines()[:1]
    rows.append(json.dumps({"audio_filepath": str(broken), "text": "x", "duration": 1.0}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    out = tmp_path / "rows.json"
    code = main(["bench", "--manifest", str(bad), "--model", str(ckpt), "--threads", "1",
                 "--methods", "greedy", "--json", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and str(broken) in errors[0]
    assert errors[0].startswith("speechllama bench: error: ")
    assert [r["utterances"] for r in json.loads(out.read_text())] == [1]


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: speechllama bench" in out and "--methods" in out and "verify-topk@N" in out


class _Refuses(_Recorder):
    def run(self, batch: EncodedBatch) -> tuple[list[Output], float]:
        raise ValueError("prompt lookup needs input_ids")


def test_a_peer_refused_by_its_library_is_skipped_with_a_note():
    log: list[tuple[str, int]] = []
    runners = {"greedy": _Recorder("greedy", log), "hf-prompt-lookup": _Refuses("x", log)}
    batch = EncodedBatch((0,), torch.zeros(1, 2, 4), torch.tensor([2]), (1.0,), (5,))
    notes: list[str] = []
    seconds, _ = _timed(runners, [batch], repeats=1, notes=notes)
    assert list(runners) == list(seconds) == ["greedy"]
    assert notes == ["skipped hf-prompt-lookup: unsupported by the installed library "
                     "(prompt lookup needs input_ids)"]  # fmt: skip
