"""What ``speechllama bench`` can run: named methods and the runners that decode one batch of
shared audio embeddings with them.

Methods are named ``family`` or ``family@ARG`` (``threshold@0.8``, ``verify-exact@0.3`` and
``tree-draft@0.1`` (confidence-gated drafting), ``verify-topk@3``, ``tree@3-2-1``, ``beam@4``,
``prefix-beam@4``, ``prefix-beam-rescored@4``), with ``+compiled`` after any of our own for the
same strategy on compiled decoder calls; each family is one ``@register_method`` parser, so
adding one is one function here and nothing else. A method whose strategy is not installed, that
needs K > 1 heads on a K = 1 model, or whose peer library is missing is skipped with a note
(:func:`build_runners`). Greedy always runs: it is the reference.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from speechllama.decoding import DecodingOptions, available_strategies, get_strategy
from speechllama.decoding.base import decode
from speechllama.decoding.drafting import is_auto

if TYPE_CHECKING:
    from speechllama.model.compiled import CompiledCalls
    from speechllama.transcribe import Transcriber

DEFAULT_METHODS = (
    "greedy,threshold@0.9,threshold@0.7,threshold@0.5,verify-exact,verify-topk@3,tree,"
    "hf-generate,hf-prompt-lookup"
)


# Method name suffix: the same strategy with compiled decoder calls (speechllama.model.compiled).
COMPILED = "+compiled"


@dataclass(frozen=True)
class Method:
    """One row of the table. ``family`` "strategy" decodes with ``get_strategy(options)``;
    "hf" runs ``transformers``' ``generate()`` (``prompt_lookup``: its
    ``prompt_lookup_num_tokens``). ``multi_token`` methods need a model with K > 1 heads.
    ``compiled``: our strategy with decoder calls through ``torch.compile`` (name suffix
    ``+compiled``), so eager and compiled calls are timed in one run."""

    name: str
    family: str
    options: DecodingOptions
    multi_token: bool = False
    prompt_lookup: int | None = None
    compiled: bool = False


MethodParser = Callable[[str | None, DecodingOptions], Method]
METHODS: dict[str, tuple[MethodParser, str]] = {}


def register_method(family: str, usage: str) -> Callable[[MethodParser], MethodParser]:
    """Decorator: parse ``family`` / ``family@ARG`` with the decorated function."""

    def add(parser: MethodParser) -> MethodParser:
        METHODS[family] = (parser, usage)
        return parser

    return add


def _number(family: str, arg: str | None, kind: type, default: Any = None) -> Any:
    if arg is None:
        if default is None:
            raise ValueError(f"method {family!r} needs an argument: {METHODS[family][1]}")
        return default
    try:
        return kind(arg)
    except ValueError:
        raise ValueError(f"method {family}@{arg}: {arg!r} is not a {kind.__name__}") from None


def _probability(family: str, arg: str | None, what: str) -> float:
    """``family@P``'s P, which must lie in (0, 1]; ``what`` names it in the error."""
    p = _number(family, arg, float)
    if not 0 < p <= 1:
        raise ValueError(f"method {family}@{arg}: the {what} must lie in (0, 1]")
    return p


def _draft(family: str, arg: str | None) -> tuple[float | str, str]:
    """``family@P`` or ``family@auto`` (measured per model, see ``decoding/drafting.py``) ->
    (the draft threshold, the method's name: P as ``:g`` prints it, or ``auto``)."""
    if arg == "auto":
        return arg, f"{family}@auto"
    p = _probability(family, arg, "draft threshold")
    return p, f"{family}@{p:g}"


def _strategy(name: str, base: DecodingOptions, multi: bool, **fields: Any) -> Method:
    return Method(name, "strategy", dataclasses.replace(base, **fields), multi_token=multi)


def _bare(family: str, arg: str | None) -> None:
    if arg is not None:
        raise ValueError(f"method {family!r} takes no argument, got {family}@{arg}")


@register_method("greedy", "greedy")
def _greedy(arg: str | None, base: DecodingOptions) -> Method:
    _bare("greedy", arg)
    return _strategy("greedy", base, False, strategy="greedy")


@register_method("threshold", "threshold@T, 0 < T <= 1")
def _threshold(arg: str | None, base: DecodingOptions) -> Method:
    t = _probability("threshold", arg, "threshold")
    return _strategy(f"threshold@{t:g}", base, True, strategy="threshold", threshold=t)


@register_method("verify-exact", "verify-exact[@P|auto]: drafts while confidence >= P")
def _verify_exact(arg: str | None, base: DecodingOptions) -> Method:
    if arg is None:
        return _strategy("verify-exact", base, True, strategy="verify", verify="exact")
    p, name = _draft("verify-exact", arg)
    return _strategy(name, base, True, strategy="verify", verify="exact", draft_threshold=p)


@register_method("verify-topk", "verify-topk@N, N >= 1")
def _verify_topk(arg: str | None, base: DecodingOptions) -> Method:
    n = _number("verify-topk", arg, int)
    if n < 1:
        raise ValueError(f"method verify-topk@{arg}: N must be at least 1")
    return _strategy(f"verify-topk@{n}", base, True, strategy="verify", verify="topk", topk=n)


@register_method("tree-draft", "tree-draft@P|auto, 0 < P <= 1 (the default tree, pruned per call)")
def _tree_draft(arg: str | None, base: DecodingOptions) -> Method:
    p, name = _draft("tree-draft", arg)
    return _strategy(name, base, True, strategy="tree", draft_threshold=p)


@register_method("tree", "tree or tree@3-2-1 (candidates per depth)")
def _tree(arg: str | None, base: DecodingOptions) -> Method:
    if arg is None:
        return _strategy("tree", base, True, strategy="tree")
    try:
        shape = tuple(int(x) for x in arg.split("-"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValueError(f"method tree@{arg}: expected counts per depth like tree@3-2-1")
    return _strategy(f"tree@{arg}", base, True, strategy="tree", tree=shape)


def _beam_family(
    family: str, arg: str | None, base: DecodingOptions, multi: bool, **fields: Any
) -> Method:
    n = _number(family, arg, int)
    if n < 1:
        raise ValueError(f"method {family}@{arg}: N must be at least 1")
    strategy = fields.pop("strategy", family)
    return _strategy(f"{family}@{n}", base, multi, strategy=strategy, beam_size=n, **fields)


@register_method("beam", "beam@N, N >= 1")
def _beam(arg: str | None, base: DecodingOptions) -> Method:
    return _beam_family("beam", arg, base, False)


@register_method("prefix-beam", "prefix-beam@N, N >= 1 (scored by the heads)")
def _prefix_beam(arg: str | None, base: DecodingOptions) -> Method:
    return _beam_family("prefix-beam", arg, base, True, prefix_rescore=False)


@register_method("prefix-beam-rescored", "prefix-beam-rescored@N (blocks rescored by head 1)")
def _prefix_beam_rescored(arg: str | None, base: DecodingOptions) -> Method:
    return _beam_family("prefix-beam-rescored", arg, base, True, strategy="prefix-beam",
                        prefix_rescore=True)  # fmt: skip


@register_method("hf-generate", "hf-generate")
def _hf_generate(arg: str | None, base: DecodingOptions) -> Method:
    _bare("hf-generate", arg)
    return Method("hf-generate", "hf", dataclasses.replace(base, batch_size=1))


@register_method("hf-prompt-lookup", "hf-prompt-lookup or hf-prompt-lookup@N (default 3)")
def _hf_prompt_lookup(arg: str | None, base: DecodingOptions) -> Method:
    n = _number("hf-prompt-lookup", arg, int, default=3)
    if n < 1:
        raise ValueError(f"method hf-prompt-lookup@{arg}: N must be at least 1")
    name = "hf-prompt-lookup" if arg is None else f"hf-prompt-lookup@{n}"
    return Method(name, "hf", dataclasses.replace(base, batch_size=1), prompt_lookup=n)


def parse_methods(spec: str | Sequence[str], base: DecodingOptions) -> list[Method]:
    """``"greedy,threshold@0.8,..."`` -> methods (duplicates dropped), greedy first and always
    present (it is the reference for speed-up and ``identical_to_greedy``)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    methods: dict[str, Method] = {}
    for raw in (n.strip() for n in names):
        if not raw:
            continue
        plain = raw.removesuffix(COMPILED)
        family, _, arg = plain.partition("@")
        if family not in METHODS:
            raise ValueError(f"unknown method {raw!r}; choose from {', '.join(METHODS)}")
        method = METHODS[family][0](arg if "@" in plain else None, base)
        if plain != raw:
            if method.family != "strategy":
                raise ValueError(f"method {raw!r}: only our own strategies compile")
            method = dataclasses.replace(method, name=method.name + COMPILED, compiled=True)
        methods.setdefault(method.name, method)
    greedy = methods.pop("greedy", None) or _greedy(None, base)
    return [greedy, *methods.values()]


# --- encoded audio and runners ------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One utterance decoded by one method: its tokens (no BOS/EOS) and decoder calls."""

    tokens: tuple[int, ...]
    calls: int


@dataclass(frozen=True)
class EncodedBatch:
    """Audio embeddings shared by every method. audio (B, S, d), lens (B,); ``indices`` are
    utterance numbers; ``limits`` are greedy's transcript length limits (HF's max_new_tokens)."""

    indices: tuple[int, ...]
    audio: torch.Tensor
    lens: torch.Tensor
    durations: tuple[float, ...]
    limits: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.indices)

    def first(self) -> EncodedBatch:
        """A batch of its first row alone (for warm-up)."""
        n = int(self.lens[0])
        return EncodedBatch(self.indices[:1], self.audio[:1, :n], self.lens[:1],
                            self.durations[:1], self.limits[:1])  # fmt: skip


class Runner(Protocol):
    batch_size: int
    lookahead: int  # most tokens fed beyond the kept length in one call (cache room)

    def run(self, batch: EncodedBatch) -> tuple[list[Output], float]:
        """Decode ``batch``; return outputs in row order and the decoding seconds."""
        ...


class StrategyRunner:
    """Our decoding loop with one strategy; times the whole ``decode`` call (prefill, calls and
    cache allocation: what a user pays). ``decode`` reads the tokens back after every call, so
    the time is complete on a GPU too."""

    def __init__(
        self,
        transcriber: Transcriber,
        options: DecodingOptions,
        compiled: CompiledCalls | None = None,
    ) -> None:
        self.model = transcriber.model
        self.compiled = compiled if compiled is not None else self.model.compiled
        before, self.model.compiled = self.model.compiled, self.compiled
        try:  # an "auto" draft threshold is measured on the calls this runner makes
            self.strategy = get_strategy(options, self.model)
        finally:
            self.model.compiled = before
        self.batch_size = options.batch_size
        self.lookahead = self.strategy.lookahead

    def warm_up(self) -> None:
        """Compile the graphs this strategy can meet (nothing for eager calls)."""
        if self.compiled is not None:
            self.compiled.warm_up(self.model, self.strategy.num_heads, self.batch_size)

    def run(self, batch: EncodedBatch) -> tuple[list[Output], float]:
        cfg = self.model.config
        before, self.model.compiled = self.model.compiled, self.compiled
        try:
            t0 = time.perf_counter()
            decoded = decode(self.model, self.strategy, batch.audio, batch.lens,
                             batch.durations, eos_id=cfg.eos_id, pad_id=cfg.pad_id,
                             max_seq_len=cfg.decoder.max_seq_len)  # fmt: skip
            seconds = time.perf_counter() - t0
        finally:
            self.model.compiled = before
        return [Output(d.tokens, d.decoder_calls) for d in decoded], seconds


def _skip_reason(method: Method, heads: int, int8: bool) -> str | None:
    if method.compiled:
        from speechllama.model.compiled import compile_available

        if (why := compile_available()) is not None:
            return why
        if int8:
            return "compiled decoder calls need float32 or bfloat16 weights, not int8"
    if method.family == "strategy":
        if method.options.strategy not in available_strategies():
            return f"strategy {method.options.strategy!r} is not installed"
        if method.multi_token and heads < 2:
            return f"needs K > 1 prediction heads; this model decodes with K = {heads}"
    return None


def build_runners(
    transcriber: Transcriber, methods: Sequence[Method], notes: list[str]
) -> dict[str, Runner]:
    """A runner per method that can run here; a note for each one that cannot."""
    from speechllama.bench_hf import HFPeer, HFPeerError, HFRunner

    model = transcriber.model
    runners: dict[str, Runner] = {}
    skipped: dict[str, list[str]] = {}  # reason -> methods, so the notes stay short
    peer: HFPeer | None = None
    compiled: CompiledCalls | None = None  # one set of graphs for every +compiled method
    for method in methods:
        heads = method.options.num_heads or model.config.heads.num_heads
        reason = _skip_reason(method, heads, model.heads.packed.int8)
        try:
            if reason is None and method.family == "hf":
                peer = peer if peer is not None else HFPeer(model)
                runners[method.name] = HFRunner(peer, method.prompt_lookup)
            elif reason is None and method.compiled:
                if compiled is None:
                    from speechllama.model.compiled import CompiledCalls

                    compiled = model.compiled or CompiledCalls.for_model(model)
                runners[method.name] = StrategyRunner(transcriber, method.options, compiled)
            elif reason is None:
                runners[method.name] = StrategyRunner(transcriber, method.options)
            if method.name in runners and is_auto(method.options):
                p = runners[method.name].strategy.options.draft_threshold
                notes.append(
                    f"{method.name}: draft threshold {p:.3f}, from this machine's call costs"
                )
        except HFPeerError as err:
            reason = str(err)
        if reason is not None:
            skipped.setdefault(reason, []).append(method.name)
    notes += [f"skipped {', '.join(names)}: {reason}" for reason, names in skipped.items()]
    return runners
