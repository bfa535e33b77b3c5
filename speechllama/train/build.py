"""What a training run starts from: the tokenizer, the model, and its provenance record.

Kept apart from the loop so the loop reads as the loop: these functions decide *which* model
(a preset sized to the tokenizer, or an ``--init`` checkpoint) and *which* tokenizer (a file,
one trained on ``--text``, or the one inside the checkpoint being resumed or fine-tuned).
"""

from __future__ import annotations

import datetime as _dt
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from speechllama.checkpoint import load_checkpoint
from speechllama.model.config import HeadsConfig, ModelConfig, preset
from speechllama.text import Tokenizer, read_lines, tokenizer_id, train_tokenizer

if TYPE_CHECKING:
    from speechllama.train.config import TrainConfig


TOKENIZER = "tokenizer.model"  # where a run trains its tokenizer (resolve_tokenizer)


def resolve_tokenizer(
    tokenizer: str | None,
    text_files: Sequence[str],
    fallback_texts: Sequence[str],
    out_dir: Path,
    vocab_size: int,
) -> Tokenizer:
    """Load ``tokenizer``, or train one (on ``text_files``, else on ``fallback_texts``, the
    training transcripts) into ``out_dir/tokenizer.model``. Texts are normalised first, so the
    pieces are learned on exactly what the model will be asked to write."""
    if tokenizer is not None:
        return Tokenizer.load(tokenizer)
    sentences: Iterable[str] = (
        (line for f in text_files for line in read_lines(f)) if text_files else fallback_texts
    )
    return train_tokenizer(sentences, out_dir / TOKENIZER, vocab_size)


def fresh_model(cfg: TrainConfig, out_dir: Path, is_main: bool = True) -> tuple[Any, Tokenizer]:
    """The model and tokenizer a new (not resumed) run starts from: a sourced preset's LLM
    tokens, else ``--tokenizer`` or one trained on ``--text`` or the training transcripts (rank
    0 trains it; the other ranks, ``is_main`` False, load what rank 0 wrote into ``out_dir``),
    else ``--init``'s own; then ``--heads-from``'s trained heads."""
    from speechllama.model.config import SOURCED_PRESETS
    from speechllama.model.sourced import source_tokenizer

    if cfg.preset in SOURCED_PRESETS:
        if cfg.tokenizer is not None or cfg.text:
            raise ValueError(
                f"preset {cfg.preset!r} writes its LLM's own tokens: no --tokenizer/--text"
            )
        tok = source_tokenizer(preset(cfg.preset, SOURCED_PRESETS[cfg.preset]))
    elif cfg.init is None or cfg.tokenizer is not None:
        texts: list[str] = []
        if cfg.tokenizer is None and not cfg.text:
            from speechllama.data.manifest import load_manifest

            texts = [u.text for u in load_manifest(cfg.train_manifest)]
        given = cfg.tokenizer or (None if is_main else str(out_dir / TOKENIZER))
        tok = resolve_tokenizer(given, cfg.text, texts, out_dir, cfg.vocab_size)
    else:
        tok = None  # the --init checkpoint's own
    given_heads = (("num_heads", cfg.num_heads), ("kind", cfg.head_kind),
                   ("loss_weights", cfg.head_loss_weights))  # fmt: skip
    heads = {k: v for k, v in given_heads if v is not None}
    model, tok = build_model(
        cfg.preset, cfg.init, tok, ctc=bool(cfg.ctc_weight), heads=heads,
        overrides=cfg.model_overrides,
    )  # fmt: skip
    if cfg.heads_from:
        from speechllama.model.heads import copy_heads

        try:
            copy_heads(model, load_checkpoint(cfg.heads_from)[0])
        except ValueError as err:
            raise ValueError(f"--heads-from {cfg.heads_from}: {err}") from None
    return model, tok


def build_model(
    preset_name: str | None,
    init: str | None,
    tokenizer: Tokenizer | None,
    *,
    ctc: bool,
    heads: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, Tokenizer]:
    """A SpeechLLaMA to train and its tokenizer.

    ``preset_name``: a fresh model sized to ``tokenizer``; a sourced encoder gets its pretrained
    weights. ``init``: the checkpoint's model and tokenizer (fine-tuning). ``ctc`` adds the
    CTC head to a preset. ``overrides`` sets dotted preset keys (``{"adapter.norm": "rms"}``,
    see ``ModelConfig.with_overrides``); a checkpoint's architecture is fixed. ``heads`` overrides
    ``HeadsConfig`` fields: of a preset, or of an
    ``init`` model, whose next-token output layer then seeds the new heads (``expand_heads``:
    head 1 starts equal to the old model, as the paper's "heads from a trained model"); kind
    ``linear`` reduces a multi-token ``init`` to its next-token trunk."""
    from speechllama.model.speechllama import SpeechLLaMA

    if init is not None:
        if overrides and not all(k.startswith(LORA_KEYS) or k in CTC_KEYS for k in overrides):
            raise ValueError(
                "--model-set changes a preset; a --init checkpoint keeps its config (except "
                "decoder.lora_rank/lora_alpha/lora_targets, which add LoRA to its decoder, and "
                "ctc/ctc_on/ctc_tied, which add a CTC head)"
            )
        model, tok, _ = load_checkpoint(init)
        lora = {k: v for k, v in (overrides or {}).items() if k.startswith(LORA_KEYS)}
        if lora:
            model = with_lora(model, lora)
        ctc_set = {k: v for k, v in (overrides or {}).items() if k in CTC_KEYS}
        if ctc or ctc_set:
            model = with_ctc(model, {"ctc": True, **ctc_set})
        if tokenizer is not None and tokenizer_id(tokenizer) != tokenizer_id(tok):
            raise ValueError(f"{init}: --tokenizer differs from the checkpoint's tokenizer")
        if heads:
            model = _reheaded(model, HeadsConfig(**{**model.config.heads.__dict__, **heads}))
        return model.train(), tok
    if tokenizer is None or preset_name is None:
        raise ValueError("a preset needs a tokenizer")
    cfg: ModelConfig = preset(preset_name, tokenizer.vocab_size)
    if ctc and not cfg.ctc:
        cfg = cfg.replace(ctc=True)
    if heads:
        cfg = cfg.replace(heads=HeadsConfig(**{**cfg.heads.__dict__, **heads}))
    if overrides:
        cfg = cfg.with_overrides(overrides)
    cfg.validate()
    model = SpeechLLaMA(cfg)
    # Pretrained parts: the encoder, and a pretrained LLM (``smollm``), loaded and frozen; its
    # adapter, heads' maps and LoRA factors (``decoder.lora_rank``) train. Latent maps start as
    # the identity, so head 1 is the LLM's own output layer from step 0.
    from speechllama.model.sourced import load_sources

    load_sources(model)
    return model.train(), tokenizer


def _reheaded(model: torch.nn.Module, new: HeadsConfig) -> torch.nn.Module:
    """``model`` with heads config ``new``: the same heads with other loss weights keep their
    weights; ``linear`` reduces a multi-token model to its next-token trunk; any other change
    puts fresh heads (copies of head 1) on the trunk."""
    from speechllama.model.heads import expand_heads, next_token_model

    old = model.config.heads
    if new == old:
        return model
    if new.architecture() == old.architecture():
        model.config = model.config.replace(heads=new)
        return model
    return next_token_model(model) if new.kind == "linear" else expand_heads(model, new)


LORA_KEYS = ("decoder.lora_rank", "decoder.lora_alpha", "decoder.lora_targets")
CTC_KEYS = ("ctc", "ctc_on", "ctc_tied")


def with_ctc(model: torch.nn.Module, overrides: dict[str, Any]) -> torch.nn.Module:
    """``model`` (a trained checkpoint) with a fresh auxiliary CTC head as ``overrides``
    (``ctc``/``ctc_on``/``ctc_tied``) ask, for a fine-tuning stage that adds CTC: e.g. an
    adapter trained without it whose outputs CTC should pull towards the LLM's token
    embeddings. A head the checkpoint already has, in the same configuration, is kept."""
    from speechllama.model.speechllama import build_ctc_head

    cfg = model.config.with_overrides(overrides)
    if cfg == model.config and model.ctc_head is not None:
        return model
    head = build_ctc_head(cfg, int(model.encoder.output_dim))  # None for ``ctc=false``
    model.ctc_head = None if head is None else head.to(model.decoder.embed.weight.device)
    model.config = cfg
    return model


def with_lora(model: torch.nn.Module, overrides: dict[str, Any]) -> torch.nn.Module:
    """``model`` (a trained checkpoint) with fresh LoRA deltas on its decoder, as ``overrides``
    (``decoder.lora_*`` keys) ask: the next stage of a frozen LLM's training (adapter first,
    then the decoder's low-rank deltas). A fresh delta is zero, so the model is unchanged."""
    from speechllama.model.lora import add_lora

    cfg = model.config.with_overrides(overrides)
    if model.config.decoder.lora_rank > 0:
        raise ValueError("this checkpoint's decoder already has LoRA deltas")
    d = cfg.decoder
    if d.lora_rank <= 0:
        raise ValueError("--model-set decoder.lora_rank must be > 0 to add LoRA")
    add_lora(model.decoder, d.lora_rank, d.lora_alpha, tuple(d.lora_targets))
    model.config, model.decoder.cfg = cfg, d
    return model


def git_commit() -> str | None:
    """The source tree's commit (with ``-dirty`` when modified), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def provenance(train_config: dict[str, Any], **facts: Any) -> dict[str, Any]:
    """The ``training`` record of a checkpoint's config.json."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "train_config": train_config,
        **facts,
    }
