"""Encoder precision (``--encoder-dtype``): what ``auto`` resolves to, a bf16 Whisper encoder
that stays close to fp32 and hands fp32 embeddings on, and the flag end to end."""

from __future__ import annotations

import pytest
import torch
from test_transcribe import make_checkpoint, write_wav

from speechllama.cli import main
from speechllama.model import precision
from speechllama.model.config import AdapterConfig, EncoderConfig, ModelConfig
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.model.whisper_encoder import WhisperEncoder

torch.set_num_threads(1)


def _whisper_model(n_layers: int = 2, max_frames: int = 1500) -> SpeechLLaMA:
    """A small Whisper-shaped model (convs, attention, GELU MLP, LayerNorms), fp32, eval."""
    config = ModelConfig(
        encoder=EncoderConfig(kind="whisper", n_mels=16, d_model=32, n_layers=n_layers,
                              n_heads=4, d_ff=64),
        adapter=AdapterConfig(kind="mlp", stack=2),
    )  # fmt: skip
    encoder = WhisperEncoder(16, 32, n_layers, 4, 64, max_frames=max_frames)
    return SpeechLLaMA(config, encoder=encoder).eval()


def test_auto_is_bf16_only_on_a_cpu_with_amx(monkeypatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision, "has_amx", lambda: True)
    assert precision.encoder_dtype("auto", cpu) == torch.bfloat16
    assert precision.encoder_dtype("auto", gpu) == torch.float32
    monkeypatch.setattr(precision, "has_amx", lambda: False)
    assert precision.encoder_dtype("auto", cpu) == torch.float32
    assert precision.encoder_dtype("bfloat16", cpu) == torch.bfloat16
    assert precision.encoder_dtype("float32", cpu) == torch.float32
    with pytest.raises(ValueError, match="unknown encoder precision 'fp8'; choose auto"):
        precision.encoder_dtype("fp8", cpu)


def test_bf16_whisper_encoder_follows_fp32_and_returns_fp32_embeddings() -> None:
    """A Whisper-shaped encoder (convs, attention, GELU MLP, LayerNorms) with bf16 matmul
    weights under autocast: embeddings within bf16 rounding of the fp32 model's, still fp32,
    masked as before, and the norms and positional table untouched."""
    torch.manual_seed(0)
    fp32, bf16 = _whisper_model(), _whisper_model()
    bf16.load_state_dict(fp32.state_dict())
    bf16.set_encoder_precision("bfloat16")
    block = bf16.encoder.blocks[0]
    assert block.fc1.weight.dtype == bf16.encoder.conv1.weight.dtype == torch.bfloat16
    assert block.attn_ln.weight.dtype == bf16.encoder.positions.dtype == torch.float32
    assert bf16.decoder.embed.weight.dtype == torch.float32
    feats, lens = torch.randn(3, 40, 16), torch.tensor([40, 31, 12])
    with torch.inference_mode():
        ref, ref_lens = fp32.encode(feats, lens)
        out, out_lens = bf16.encode(feats, lens)
    assert out.dtype == torch.float32 and out.shape[1] >= ref.shape[1]  # padded to a bucket
    assert torch.equal(out_lens, ref_lens)
    for row, n in enumerate(out_lens.tolist()):
        assert (out[row, :n] - ref[row, :n]).abs().max() < 0.05 * ref.abs().max()
    with torch.inference_mode():  # padding does not leak into a shorter row
        alone, _ = bf16.encode(feats[2:, :12], lens[2:])
    n = int(out_lens[2])
    torch.testing.assert_close(alone[0, :n], out[2, :n], atol=0.05 * ref.abs().max(), rtol=0)


def test_encoder_dtype_flag_end_to_end(tmp_path, capsys) -> None:
    from speechllama import load_model

    ckpt = make_checkpoint(tmp_path / "model")
    wavs = [write_wav(tmp_path / f"w{i}.wav", d, seed=i) for i, d in enumerate([0.5, 0.3])]
    code = main(["transcribe", "--model", str(ckpt), "--threads", "1", "--encoder-dtype",
                 "bfloat16", *map(str, wavs)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    lines = dict(line.split("\t", 1) for line in captured.out.splitlines())
    bf16 = load_model(ckpt, encoder_precision="bfloat16")
    assert bf16.meta["encoder_precision"] == "bfloat16"
    assert bf16.model.encoder_dtype == torch.bfloat16
    assert [lines[str(w)] for w in wavs] == [r.text for r in bf16.transcribe(wavs)]
    fp32 = load_model(ckpt, encoder_precision="float32")
    assert "encoder_precision" not in fp32.meta and fp32.model.encoder_dtype == torch.float32
    with pytest.raises(SystemExit):
        main(["transcribe", "--model", str(ckpt), "--encoder-dtype", "fp8", *map(str, wavs)])


def test_bf16_encoder_input_is_padded_to_a_bucket_within_the_encoder_limit() -> None:
    """Few input shapes (oneDNN builds its bf16 kernels per shape): T rounds up to a multiple
    of FRAME_BUCKET, never past the encoder's longest input, never shorter than T."""
    b = precision.FRAME_BUCKET
    x = torch.randn(2, 40, 3)
    padded = precision.bucket_frames(x)
    assert padded.shape == (2, -(-40 // b) * b, 3)
    assert torch.equal(padded[:, :40], x) and padded[:, 40:].abs().max() == 0
    assert precision.bucket_frames(torch.zeros(1, 2 * b, 3)).shape[1] == 2 * b
    assert precision.bucket_frames(torch.zeros(1, 2990, 3), limit=3000).shape[1] == 3000
    assert precision.bucket_frames(torch.zeros(1, 3001, 3), limit=3000).shape[1] == 3001
    assert [precision.bucket_length(t, 100) for t in (1, b, b + 1, 99, 100)] == [
        b,
        b,
        2 * b,
        100,
        100,
    ]
    assert WhisperEncoder().max_input_frames == 3000


def test_warm_up_encoder_builds_every_bucket_once(monkeypatch) -> None:
    from speechllama.model.config import preset

    seen: list[int] = []
    model = SpeechLLaMA(preset("tiny", 40)).eval()
    assert precision.warm_up_encoder(model, 200) == 0.0  # fp32: nothing to build
    model.set_encoder_precision("bfloat16")
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda f, n: seen.append(f.shape[1]) or encode(f, n))
    assert precision.warm_up_encoder(model, 100) > 0
    b = precision.FRAME_BUCKET
    assert seen == list(range(b, 100 + b, b))  # what 1..100 frames are padded to


def test_warm_up_encoder_stays_within_the_whisper_limit() -> None:
    """30 s of Whisper frames (3000) is not a multiple of the bucket: the last shape is the
    limit itself, and nothing past it is built (it would be refused)."""
    model = _whisper_model(n_layers=1, max_frames=50)  # inputs of at most 100 frames
    model.set_encoder_precision("bfloat16")
    seen: list[int] = []
    forward = model.encoder.forward
    model.encoder.forward = lambda f, n: seen.append(f.shape[1]) or forward(f, n)
    assert precision.warm_up_encoder(model, 100) > 0
    b = precision.FRAME_BUCKET
    assert seen == [*range(b, 100, b), 100]
