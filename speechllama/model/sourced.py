"""Model parts whose weights come from installed packages instead of our checkpoints.

A frozen Whisper encoder (``EncoderConfig.source``) and a frozen pretrained LLM decoder
(``DecoderConfig.source``: a GGUF file, see :mod:`speechllama.model.gguf_llama`) are read at
load time, so a checkpoint holds only what we train (adapter, heads, ...): a few MB rather than
the LLM's half gigabyte of float32. The LLM's tokenizer comes from the same file as its weights.

:func:`model_from_preset` builds a sourced preset (``smollm``) by name when no trained checkpoint
of it exists: pretrained encoder and decoder, untrained adapter and heads (latent heads start as
the identity, so head 1 is exactly the LLM's output layer).
"""

from __future__ import annotations

import torch

from speechllama.model.config import SOURCED_PRESETS, ModelConfig, preset
from speechllama.model.decoder import LlamaDecoder
from speechllama.model.gguf_llama import load_gguf_decoder
from speechllama.model.lora import is_lora_name, lora_parameters
from speechllama.model.speechllama import SpeechLLaMA
from speechllama.tokenizer_bpe import BPETokenizer

__all__ = [
    "decoder_from_source",
    "load_sourced_decoder",
    "load_sources",
    "model_from_preset",
    "source_tokenizer",
    "sourced_decoder_names",
]

# The adapter and heads of a preset built by name start from this seed, so that two loads of
# the (untrained) preset transcribe alike.
PRESET_SEED = 0


def decoder_from_source(config: ModelConfig) -> bool:
    """True when the decoder's pretrained weights (and tokenizer) come from ``decoder.source``."""
    return config.decoder.source is not None


def sourced_decoder_names(config: ModelConfig) -> set[str]:
    """State-dict names (of a :class:`SpeechLLaMA`) that a sourced decoder fills: the LLM's own
    weights and its output layer ``heads.proj.weight`` (tied or not), and nothing a run adds
    (heads' maps, future low-rank deltas). Empty when the decoder is not sourced."""
    if not decoder_from_source(config):
        return set()
    with torch.device("meta"):  # names only: allocating the LLM to list them would cost seconds
        names = LlamaDecoder(config.decoder).state_dict()
    llm = {f"decoder.{name}" for name in names if not is_lora_name(name)}
    return llm | {"heads.proj.weight"}


@torch.no_grad()
def load_sourced_decoder(model: SpeechLLaMA, fresh: bool) -> None:
    """Fill ``model``'s decoder and output layer from ``config.decoder.source`` and freeze them
    (their weights are not saved, so training them would be lost).

    ``fresh``: the heads are new too, so every head restarts from the LLM's output layer
    (``load_unembedding``). Otherwise (a trained checkpoint) only head 1's output layer is
    set, so trained heads are kept."""
    source = model.config.decoder.source
    if source is None:
        raise ValueError("this model's decoder has no source")
    lm_head = load_gguf_decoder(model.decoder, source)
    heads = model.heads
    unembedding = model.decoder.embed.weight if lm_head is None else lm_head
    if fresh:
        heads.load_unembedding(unembedding)
    elif lm_head is not None:
        heads.proj.weight.copy_(lm_head)
    model.decoder.requires_grad_(False)
    heads.proj.weight.requires_grad_(False)
    for delta in lora_parameters(model.decoder):  # LoRA factors are ours: saved, so trainable
        delta.requires_grad_(True)


def source_tokenizer(config: ModelConfig) -> BPETokenizer:
    """The sourced LLM's tokenizer, checked against the model's vocabulary and special ids."""
    source = config.decoder.source
    if source is None:
        raise ValueError("this model's decoder has no source, so no tokenizer comes with it")
    tokenizer = BPETokenizer(source)
    ours = (config.decoder.vocab_size, config.bos_id, config.eos_id, config.pad_id)
    theirs = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    if ours != theirs:
        raise ValueError(
            f"{source}: tokenizer vocabulary/bos/eos/pad {theirs} differ from the model's {ours}"
        )
    return tokenizer


def load_sources(model: SpeechLLaMA) -> None:
    """Fill a freshly built preset model's sourced parts from their installed packages: the
    encoder (``encoder.source``) and the LLM decoder with fresh heads (``decoder.source``;
    frozen, see :func:`load_sourced_decoder`). Shared by :func:`model_from_preset` and
    training's ``build_model``, so a preset is the same model in both."""
    config = model.config
    if config.encoder.source is not None:
        from speechllama.model.weights import load_encoder_weights

        load_encoder_weights(model.encoder, config.encoder.source)
    if decoder_from_source(config):
        load_sourced_decoder(model, fresh=True)


def model_from_preset(
    name: str, device: str | torch.device = "cpu"
) -> tuple[SpeechLLaMA, BPETokenizer]:
    """A sourced preset (e.g. ``smollm``) in eval mode, and its tokenizer: pretrained encoder
    and decoder from their packages, adapter and heads freshly initialised (seed
    :data:`PRESET_SEED`) and untrained."""
    if name not in SOURCED_PRESETS:
        raise ValueError(f"preset {name!r} has no pretrained decoder; train it instead")
    config = preset(name, SOURCED_PRESETS[name])
    tokenizer = source_tokenizer(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESET_SEED)
        model = SpeechLLaMA(config)
    load_sources(model)
    return model.to(device).eval(), tokenizer
