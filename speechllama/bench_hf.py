"""Hugging Face peers for ``speechllama bench``: our decoder inside ``transformers``'
``LlamaForCausalLM`` and its ``generate()``.

Why: a table that only compares our strategies with each other cannot say whether our greedy
loop is slow or fast; the same weights run through ``transformers`` are the baseline a reader
already knows. The peer gets the same audio embeddings as our strategies, as
``inputs_embeds = [audio embeddings][BOS embedding]``, so only the decoding loop differs.

The weight mapping is the reverse of ``hf_llama.load_hf_llama``; our rotary layout ("halves")
and RMSNorm are HF LLaMA's, so with a correct mapping HF's greedy output equals ours token for
token (the bench reports that as ``identical_to_greedy``; anything below 1.0 is a bug here).
Head 1 of any head kind whose next-token head is linear (every kind we have: ``latent``'s is
``U·A_1``) becomes ``lm_head``; the other heads have no place in a ``LlamaForCausalLM``.

The peers run at batch 1: batching ``inputs_embeds`` of different lengths needs left padding
and position ids rebuilt from the mask, which would make the peer's numbers depend on padding
choices rather than on ``generate()`` itself.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from speechllama.model.hf_llama import HF_LAYER_NAMES

if TYPE_CHECKING:
    from speechllama.bench_methods import EncodedBatch, Output
    from speechllama.model.speechllama import SpeechLLaMA

_TO_HF = {ours: hf for hf, ours in HF_LAYER_NAMES.items()}


class HFPeerError(ValueError):
    """The model cannot be expressed as a ``LlamaForCausalLM`` (or transformers is missing)."""


def transformers_version() -> str | None:
    """The installed transformers version, or None when it cannot be imported."""
    try:
        import transformers
    except ImportError:
        return None
    return str(transformers.__version__)


@torch.no_grad()
def head_one_weight(model: SpeechLLaMA) -> torch.Tensor:
    """The next-token head as one (V, d) matrix, read off by feeding it the identity.

    Raises ``HFPeerError`` if head 1 is not linear without bias (checked on random vectors),
    since ``lm_head`` could not represent it."""
    d = model.config.decoder.d_model
    weight = model.heads.proj.weight
    eye = torch.eye(d, dtype=weight.dtype, device=weight.device)[None]  # (1, d, d)
    matrix = model.heads(eye, num_heads=1)[0, :, 0, :].T.contiguous()  # (V, d)
    probe = torch.randn(1, 4, d, generator=torch.Generator().manual_seed(0)).to(weight)
    direct = model.heads(probe, num_heads=1)[0, :, 0, :]
    tol = 1e-4 if weight.dtype == torch.float32 else 4 * torch.finfo(weight.dtype).eps
    if not torch.allclose(direct.float(), (probe[0] @ matrix.T).float(), rtol=tol, atol=tol):
        raise HFPeerError(f"head 1 of heads.kind={model.config.heads.kind!r} is not linear")
    return matrix


def hf_state_dict(model: SpeechLLaMA) -> dict[str, torch.Tensor]:
    """Our decoder's state dict in ``LlamaForCausalLM`` names (``lm_head`` from head 1)."""
    state: dict[str, torch.Tensor] = {"lm_head.weight": head_one_weight(model)}
    for name, tensor in model.decoder.state_dict().items():
        if name == "embed.weight":
            key = "model.embed_tokens.weight"
        elif name == "norm.weight":
            key = "model.norm.weight"
        else:
            _, layer, rest = name.split(".", 2)  # layers.<i>.<rest>
            key = f"model.layers.{layer}.{_TO_HF[rest]}"
        state[key] = tensor
    return state


def to_hf_llama(model: SpeechLLaMA) -> Any:
    """A ``transformers.LlamaForCausalLM`` (eval mode, our dtype and device) computing our
    decoder + head 1. Raises ``HFPeerError`` when transformers is missing or head 1 is not
    linear."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as err:
        raise HFPeerError("transformers is not installed (pip install transformers)") from err
    cfg, top = model.config.decoder, model.config
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,  # head 1 is not always the embedding (latent heads)
        bos_token_id=top.bos_id,
        eos_token_id=top.eos_id,
        pad_token_id=top.pad_id,
    )
    weight = model.decoder.embed.weight
    hf = LlamaForCausalLM(hf_cfg).to(dtype=weight.dtype, device=weight.device).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    # Older transformers keep a rotary inv_freq buffer in the state dict; it is derived.
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise HFPeerError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf


class HFPeer:
    """Our model as a ``LlamaForCausalLM`` plus a count of its forward passes (a pre-hook, so
    prompt lookup's verification passes count as they happen). Shared by the HF runners."""

    def __init__(self, model: SpeechLLaMA) -> None:
        self.model = model
        self.hf = to_hf_llama(model)
        self.calls = 0
        self.hf.register_forward_pre_hook(self._count)
        bos = torch.tensor([model.config.bos_id], device=model.decoder.embed.weight.device)
        self.bos = model.decoder.embed(bos).detach()  # (1, d)

    def _count(self, *_: Any) -> None:
        self.calls += 1


class HFRunner:
    """Decode encoded batches with ``generate()``, one utterance per call (see module doc).

    ``prompt_lookup``: ``prompt_lookup_num_tokens`` (None: plain greedy). With only
    ``inputs_embeds`` there are no prompt ids, so prompt lookup can only find n-grams in the
    tokens generated so far.
    """

    batch_size = 1
    lookahead = 1

    def __init__(self, peer: HFPeer, prompt_lookup: int | None = None) -> None:
        self.peer = peer
        self.prompt_lookup = prompt_lookup

    def run(self, batch: EncodedBatch) -> tuple[list[Output], float]:
        """Generate every row of ``batch``; returns the outputs and the seconds spent inside
        ``generate()`` only."""
        from speechllama.bench_methods import Output

        peer, cfg = self.peer, self.peer.model.config
        kwargs: dict[str, Any] = {}
        if self.prompt_lookup is not None:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup
        outputs, seconds = [], 0.0
        for row in range(batch.size):
            n = int(batch.lens[row])
            audio = batch.audio[row, :n].to(peer.bos.dtype)  # the decoder's dtype (fp32/bf16)
            embeds = torch.cat([audio, peer.bos])[None]
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            calls0 = peer.calls
            t0 = time.perf_counter()
            generated = peer.hf.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=batch.limits[row],
                do_sample=False,
                num_beams=1,
                eos_token_id=cfg.eos_id,
                pad_token_id=cfg.pad_id,
                **kwargs,
            )
            if generated.device.type == "cuda":  # asynchronous kernels: wait before timing
                torch.cuda.synchronize(generated.device)
            seconds += time.perf_counter() - t0
            tokens = generated[0].tolist()
            if cfg.eos_id in tokens:
                tokens = tokens[: tokens.index(cfg.eos_id)]
            outputs.append(Output(tuple(tokens), peer.calls - calls0))
        return outputs, seconds
