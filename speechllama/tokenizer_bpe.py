"""A pretrained LLM's byte-level BPE tokenizer, rebuilt from its GGUF metadata.

Why: a decoder taken from an LLM (the ``smollm`` preset) must write that LLM's tokens, so its
tokenizer comes from the same file as its weights (``DecoderConfig.source``), never trained by
us and never stored in our checkpoints. The GGUF file holds the vocabulary, the merges, the
token types and the special ids; the ``tokenizers`` library does the BPE itself.

:class:`BPETokenizer` offers what the project's SentencePiece :class:`~speechllama.text.Tokenizer`
offers to decoding and training (``encode``, ``decode``, ``vocab_size``, pad/bos/eos/unk ids;
the :class:`~speechllama.text.TokenizerLike` protocol): ``encode`` adds no special tokens and
``decode`` skips pad/bos/eos.
"""

from __future__ import annotations

from collections.abc import Sequence

from speechllama.model.gguf_llama import GGUFError, gguf_field, open_gguf

__all__ = ["BPETokenizer"]


def _pre_tokenizer(kind: str, origin: str):
    """The pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre`` = ``kind``.

    ``smollm`` splits every digit on its own before GPT-2's byte-level word regex, as the
    original SmolLM2 tokenizer does; ``gpt2``/``default`` only the GPT-2 regex. Others use
    regexes we have not checked, so they are refused."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level])
    if kind in ("gpt2", "default"):
        return byte_level
    raise GGUFError(f"{origin}: unsupported BPE pre-tokenizer {kind!r}")


class BPETokenizer:
    """Byte-level BPE from a GGUF file (``tokenizer.ggml.model`` = ``gpt2``).

    Control tokens (``<|im_start|>`` ...) are not matched in text: a transcript that spells one
    out is encoded as ordinary text, as llama.cpp does without ``parse_special``, so that
    ``decode(encode(s)) == s`` for every string.

    ``pad_id``: the file's padding token unless that is EOS (SmolLM2 pads with EOS), in which
    case the unknown token: training masks pad targets, so pad must differ from EOS."""

    def __init__(self, source: str) -> None:
        from tokenizers import Tokenizer, decoders, models

        reader, origin = open_gguf(source)

        def meta(key: str, default=...):
            return gguf_field(reader, f"tokenizer.ggml.{key}", origin, default)

        if meta("model") != "gpt2":
            raise GGUFError(f"{origin}: tokenizer {meta('model')!r} is not byte-level BPE (gpt2)")
        tokens: list[str] = meta("tokens")
        merges = [tuple(m.split(" ", 1)) for m in meta("merges")]
        vocab = {token: i for i, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise GGUFError(f"{origin}: the tokenizer vocabulary has duplicate tokens")
        model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
        self._tok = Tokenizer(model)
        self._tok.pre_tokenizer = _pre_tokenizer(meta("pre", "default"), origin)
        self._tok.decoder = decoders.ByteLevel()
        self.source = source
        self.bos_id = int(meta("bos_token_id"))
        self.eos_id = int(meta("eos_token_id"))
        self.unk_id = int(meta("unknown_token_id", self.eos_id))
        pad = int(meta("padding_token_id", self.unk_id))
        self.pad_id = self.unk_id if pad == self.eos_id else pad
        self._size = len(tokens)
        for name in ("bos_id", "eos_id", "unk_id", "pad_id"):
            if not 0 <= getattr(self, name) < self._size:
                raise GGUFError(f"{origin}: {name} {getattr(self, name)} is outside the vocabulary")
        self._skip = {self.pad_id, self.bos_id, self.eos_id}

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added (the model places BOS/EOS itself)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. pad/bos/eos are skipped; an id outside the vocabulary is an error."""
        keep = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self._size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self._size})")
            if i not in self._skip:
                keep.append(i)
        return self._tok.decode(keep, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def __repr__(self) -> str:
        return f"BPETokenizer({self.source!r}, vocab_size={self.vocab_size})"
