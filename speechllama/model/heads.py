"""Output heads: decoder hidden states -> logits for the next K tokens.

Every head architecture returns logits (B, T, K, V), where ``logits[:, t, k]`` predicts the
token k + 1 places after position t (k = 0 is the ordinary next-token head). Strategies see only
that tensor (through ``SpeechLLaMA.step``), so a head kind is added by registering a builder
here and nothing else changes.

Kinds (registered by name in ``HEADS``; :func:`build_heads` picks one by ``HeadsConfig.kind``):

- ``linear``: the plain output layer, K = 1 (this module).
- ``projection``: K independent d x V output matrices; adds (K-1)·d·V (:mod:`.heads_projection`).
- ``latent``: K d x d maps through the one shared un-embedding; adds K·d² (:mod:`.heads_latent`).
- ``medusa``: residual SiLU blocks through the shared un-embedding (:mod:`.heads_medusa`).
- ``layer``: one transformer block per extra head, with its own KV cache (:mod:`.heads_layer`).

Every kind keeps head 1's (or the shared) un-embedding as ``proj`` (tied to the token embedding
when configured), so a next-token checkpoint converts into any kind (:func:`expand_heads`), and
every kind starts with all K heads equal to head 1: a fresh multi-token model predicts the next
token from every head, and training moves head k towards token t + k from there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from speechllama.model.config import HeadsConfig, ModelConfig
from speechllama.model.packed import PackedLinears

if TYPE_CHECKING:
    from speechllama.model.kv_cache import KVCache
    from speechllama.model.speechllama import SpeechLLaMA


class OutputHeads(nn.Module):
    """Base class: ``forward(hidden (B, T, d), num_heads=None) -> logits (B, T, n, V)``.

    ``proj`` is head 1's output layer (V x d), shared by the kinds that un-embed a latent.
    ``cache_layers`` counts the KV-cache layers the heads keep beyond the decoder's own (only
    ``layer`` heads attend over past positions). Position-wise kinds implement :meth:`logits`;
    they ignore the cache arguments of :meth:`forward`.
    """

    cache_layers: int = 0

    def __init__(
        self, d_model: int, vocab_size: int, num_heads: int, tie_to: nn.Embedding | None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.tied = tie_to is not None
        self.proj = nn.Linear(d_model, vocab_size, bias=False)
        self.packed = PackedLinears()  # decoder calls' weights, see :meth:`linear`
        if tie_to is not None:
            self.proj.weight = tie_to.weight
        else:
            nn.init.normal_(self.proj.weight, std=0.02)

    def active(self, num_heads: int | None) -> int:
        """The number of heads to compute: ``num_heads`` (1..K), or all K when None. Decoding
        with fewer heads than trained skips the others' work entirely."""
        if num_heads is None:
            return self.num_heads
        if not 1 <= num_heads <= self.num_heads:
            raise ValueError(f"num_heads={num_heads}, but the model has {self.num_heads} heads")
        return num_heads

    def forward(
        self,
        hidden: torch.Tensor,
        num_heads: int | None = None,
        select: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden (B, T, d) -> logits (B, T, n, V), n = ``num_heads`` or K.

        ``select`` (B, U) long: return logits only at these positions -> (B, U, n, V); heads that
        attend over the sequence need all of ``hidden`` first, the others gather at once. The
        cache arguments are those of ``LlamaDecoder.forward_cached`` for the same call."""
        n = self.active(num_heads)
        if select is not None:
            hidden = gather_positions(hidden, select)
        # A decoder call's matmuls go through PackedLinears and the model's one measured
        # policy: a separate rule here once sent SmolLM2's 49152 x 576 output layer to MKL at
        # one row (9.7 against 4.6 ms packed) and int8 one-row calls to fp32.
        return self.logits(hidden, n, decode=cache is not None)

    def logits(self, hidden: torch.Tensor, n: int, decode: bool = False) -> torch.Tensor:
        """hidden (B, T, d) -> logits (B, T, n, V) of the first n heads, position by position.
        ``decode``: a decoder call (prefill or step), whose matmuls may run on packed weights
        (:meth:`linear`)."""
        raise NotImplementedError

    def linear(
        self, x: torch.Tensor, name: str, weight: torch.Tensor, decode: bool
    ) -> torch.Tensor:
        """``F.linear(x, weight)``; in a decoder call through oneDNN-packed weights where the
        model's measured policy finds them faster (see :mod:`speechllama.model.packed`)."""
        return self.packed.linear(x, name, (weight,)) if decode else F.linear(x, weight)

    def load_unembedding(self, weight: torch.Tensor) -> None:
        """Start from a pretrained LM's output matrix (V, d): head 1 becomes it (and the heads
        derived from head 1 restart from it). Tied heads share the embedding, so copying the
        embedding into them is a no-op."""
        with torch.no_grad():
            if weight.data_ptr() != self.proj.weight.data_ptr():
                self.proj.weight.copy_(weight)

    def added_parameters(self) -> int:
        """Parameters beyond the next-token output layer (``proj``, counted once if tied)."""
        return sum(p.numel() for p in self.parameters() if p is not self.proj.weight)


def tie_target(cfg: ModelConfig, embedding: nn.Embedding) -> nn.Embedding | None:
    """The embedding the output layer shares, or None when ``cfg`` unties them."""
    return embedding if cfg.decoder.tie_embeddings else None


def gather_positions(x: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at positions select (B, U) -> (B, U, ...)."""
    index = select.reshape(*select.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, index.expand(*select.shape, *x.shape[2:]))


HeadBuilder = Callable[[ModelConfig, nn.Embedding], OutputHeads]
HEADS: dict[str, HeadBuilder] = {}


def register(kind: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator: make ``build_heads`` build ``kind`` with the decorated function."""

    def add(builder: HeadBuilder) -> HeadBuilder:
        HEADS[kind] = builder
        return builder

    return add


class LinearHead(OutputHeads):
    """The plain LM output layer (K = 1): logits = hidden @ W^T.

    When tied, ``proj.weight`` *is* the decoder's embedding parameter (one tensor, counted and
    trained once; checkpoint writers must handle the shared storage)."""

    def __init__(self, d_model: int, vocab_size: int, tie_to: nn.Embedding | None) -> None:
        super().__init__(d_model, vocab_size, 1, tie_to)

    def logits(self, hidden: torch.Tensor, n: int, decode: bool = False) -> torch.Tensor:
        """hidden (B, T, d) -> logits (B, T, 1, V)."""
        return self.linear(hidden, "proj", self.proj.weight, decode).unsqueeze(2)


@register("linear")
def _linear(cfg: ModelConfig, embedding: nn.Embedding) -> OutputHeads:
    if cfg.heads.num_heads != 1:
        raise ValueError(
            f"heads.kind='linear' is the single next-token layer; num_heads={cfg.heads.num_heads}"
            " needs a multi-token kind"
        )
    d = cfg.decoder
    return LinearHead(d.d_model, d.vocab_size, tie_target(cfg, embedding))


def build_heads(cfg: ModelConfig, embedding: nn.Embedding) -> OutputHeads:
    """The heads named by ``cfg.heads.kind``; ``embedding`` is the decoder's token embedding
    (shared with the output layer when ``cfg.decoder.tie_embeddings``)."""
    try:
        builder = HEADS[cfg.heads.kind]
    except KeyError:
        raise ValueError(
            f"unknown heads.kind {cfg.heads.kind!r}; available: {', '.join(sorted(HEADS))}"
        ) from None
    return builder(cfg, embedding)


def heads_parameter_report(cfg: ModelConfig, num_heads: int | None = None) -> dict[str, int]:
    """``{kind: parameters it adds}`` over the next-token output layer, for every registered
    kind that can have ``num_heads`` (default: ``cfg``'s K) heads on ``cfg``'s decoder.

    Built on the meta device, so it costs no memory whatever the vocabulary."""
    k = cfg.heads.num_heads if num_heads is None else num_heads
    report: dict[str, int] = {}
    with torch.device("meta"):
        embedding = nn.Embedding(cfg.decoder.vocab_size, cfg.decoder.d_model)
        for kind in sorted(HEADS):
            if kind == "linear" and k != 1:
                continue
            heads_cfg = HeadsConfig(kind=kind, num_heads=k, medusa_blocks=cfg.heads.medusa_blocks)
            report[kind] = build_heads(cfg.replace(heads=heads_cfg), embedding).added_parameters()
    return report


def expand_heads(model: SpeechLLaMA, heads_cfg: HeadsConfig) -> SpeechLLaMA:
    """A copy of ``model`` with new heads ``heads_cfg``, seeded from its next-token output
    layer (a multi-token model's head 1, which must be the plain un-embedding): encoder,
    adapter, decoder and CTC head are copied; head 1 / the shared un-embedding starts from the
    old output layer, so head 1's logits equal the old model's, and the other heads start as
    copies of head 1. For fine-tuning an existing checkpoint into a multi-token model."""
    if model.config.heads.kind != "linear":
        _check_plain_head_one(model)
    cfg = model.config.replace(heads=heads_cfg)
    cfg.validate()
    return _with_heads(model, cfg)


def next_token_model(model: SpeechLLaMA) -> SpeechLLaMA:
    """A copy of multi-token ``model`` with its heads reduced to head 1, the next-token layer
    (kind ``linear``): the trunk's greedy output is unchanged. For continuing the trunk of a
    shipped multi-token model as a next-token model, then putting heads back on it
    (:func:`expand_heads`, :func:`copy_heads`), as the paper trains heads on a trained trunk."""
    if model.config.heads.kind == "linear":
        return model
    _check_plain_head_one(model)
    return _with_heads(model, model.config.replace(heads=HeadsConfig(kind="linear", num_heads=1)))


def _with_heads(model: SpeechLLaMA, cfg: ModelConfig) -> SpeechLLaMA:
    """A copy of ``model`` whose heads are fresh ``cfg.heads`` on its un-embedding ``proj``."""
    new = copy.deepcopy(model)  # keeps the tied embedding tied inside the copy
    new.config = cfg
    weight = new.heads.proj.weight
    heads = build_heads(cfg, new.decoder.embed)
    heads.load_unembedding(weight.detach())
    new.heads = heads.to(device=weight.device, dtype=weight.dtype)
    new.heads.train(model.training)
    new._share_pack_policy()  # the fresh heads join the model's one policy
    new.decoder_calls = 0
    return new


def _check_plain_head_one(model: SpeechLLaMA) -> None:
    """Refuse heads whose head 1 is not ``proj`` alone (trained with the trunk, e.g. a latent
    head 1 map away from the identity): dropping the other heads would change greedy output.
    ``layer`` heads are not position-wise; their head 1 is ``proj`` by construction."""
    heads = model.heads
    if model.config.heads.kind == "layer":
        return
    weight = heads.proj.weight
    probe = torch.randn(1, 4, weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        plain = torch.allclose(heads.logits(probe, 1)[..., 0, :], F.linear(probe, weight))
    if not plain:
        raise ValueError(
            f"head 1 of these {model.config.heads.kind!r} heads is not the plain un-embedding "
            "(it was trained with the trunk), so the trunk alone would change greedy output"
        )


def copy_heads(model: SpeechLLaMA, donor: SpeechLLaMA) -> list[str]:
    """Copy ``donor``'s multi-token head weights into ``model`` in place, except the shared
    un-embedding ``proj`` (the trunk's own): heads trained on an earlier trunk start the heads of
    a continued one close to where they end. Both must have the same heads architecture (loss
    weights may differ) and sizes.
    Returns the copied parameter names."""
    mine, theirs = model.config.heads.architecture(), donor.config.heads.architecture()
    if theirs != mine:
        raise ValueError(f"heads differ: {theirs} (donor) against {mine}")
    state = {k: v for k, v in donor.heads.state_dict().items() if k != "proj.weight"}
    own = model.heads.state_dict()
    for name, tensor in state.items():
        if name not in own or own[name].shape != tensor.shape:
            raise ValueError(f"heads parameter {name} does not fit: {tuple(tensor.shape)}")
    model.heads.load_state_dict(state, strict=False)
    return sorted(state)


# The kinds register themselves on import; they need the names above, so they come last.
from speechllama.model import heads_latent, heads_layer, heads_medusa, heads_projection  # noqa: E402, F401
