"""Tokenizer: the checkpoint's SentencePiece model for text, `mistral-common` for chat.

A checkpoint's own `tokenizer.model.vN` or `tokenizer.model` wins. Without one, the tokenizer
`mistral-common` ships whose size is the model's vocabulary: 32000 pieces is Mixtral 8x7B's
(v1), 32768 Mixtral 8x22B Instruct's (v3, also the tiny test presets'). A model whose vocabulary
matches neither has no tokenizer: it takes token ids and answers token ids.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mistral_common
import sentencepiece
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

logger = logging.getLogger(__name__)

_SHIPPED = Path(mistral_common.__file__).parent / "data"
DEFAULT_TOKENIZER = _SHIPPED / "mistral_instruct_tokenizer_240323.model.v3"
SHIPPED_BY_VOCAB = {32000: _SHIPPED / "tokenizer.model.v1", 32768: DEFAULT_TOKENIZER}  # vocabulary -> file
_REPLACEMENT = "\ufffd"  # what a decode of an incomplete UTF-8 byte sequence ends with


class ChatFormatError(ValueError):
    """Chat messages that the Mistral chat format cannot encode (e.g. two user turns in a row)."""


class Tokenizer:
    """SentencePiece encode/decode with bos/eos, chat encoding, and streaming decoders."""

    def __init__(self, model_file: str | Path, version: str | None = None) -> None:
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"tokenizer model {self.model_file} does not exist")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        self.version = version or _version_of(self.model_file, self.sp.get_piece_size())
        self._chat: Any = None  # MistralTokenizer, built on first chat request

    @classmethod
    def default(cls) -> Tokenizer:
        return cls(DEFAULT_TOKENIZER)

    @classmethod
    def for_checkpoint(cls, path: str | Path, vocab_size: int) -> Tokenizer | None:
        """The checkpoint's own tokenizer (`tokenizer.model.vN` first, then `tokenizer.model`), else
        the shipped one of the model's vocabulary size, else None (see `missing`)."""
        path = Path(path)
        own = sorted(path.glob("tokenizer.model.v*")) + sorted(path.glob("tokenizer.model"))
        if own:
            return cls(own[0])
        shipped = SHIPPED_BY_VOCAB.get(vocab_size)
        if shipped is None:
            logger.warning("%s", cls.missing(path, vocab_size))
            return None
        logger.info("checkpoint %s has no tokenizer.model; using %s (%d pieces)", path, shipped.name, vocab_size)
        return cls(shipped)

    @staticmethod
    def missing(path: str | Path, vocab_size: int) -> str:
        """What to say about a checkpoint that has no tokenizer and matches no shipped one."""
        sizes = ", ".join(f"{n}: {f.name.rsplit('.', 1)[-1]}" for n, f in SHIPPED_BY_VOCAB.items())
        return (
            f"this model has no tokenizer: {path} holds no tokenizer.model (or tokenizer.model.vN) and its "
            f"vocabulary of {vocab_size} matches none that mistral-common ships ({sizes}); send token ids, or "
            "put the model's tokenizer.model in the checkpoint"
        )

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids: list[int] = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control pieces (bos, eos, [INST], ...) decode to nothing, and so do ids past
        the tokenizer's pieces (a model's vocabulary may be padded beyond them)."""
        size = self.vocab_size
        return str(self.sp.decode([i for i in ids if 0 <= i < size]))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: a byte-fallback piece its byte, a control piece its name
        ("</s>"), a text piece its text with SentencePiece's word mark as a space."""
        if not 0 <= token_id < self.vocab_size:
            return b""
        piece = str(self.sp.id_to_piece(token_id))
        if self.sp.is_byte(token_id):  # "<0xE2>"
            return bytes([int(piece[3:5], 16)])
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return piece.encode()
        return piece.replace("\u2581", " ").encode()

    @property
    def tool_calls_id(self) -> int | None:
        """The id of the `[TOOL_CALLS]` control piece (v2 and v3 formats), None where it has none (v1)."""
        i = int(self.sp.piece_to_id("[TOOL_CALLS]"))
        return i if self.sp.is_control(i) and not self.sp.is_unknown(i) else None

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Prompt tokens of an OpenAI-style conversation (content parts, assistant tool calls and
        tool results included) and the functions it may call, in the reference Mistral chat format:
        mistral-common's own request classes encode it."""
        if tools and self.tool_calls_id is None:
            raise ChatFormatError(f"the {self.version} chat format has no tool calls; send no tools")
        if self._chat is None:
            self._chat = _chat_tokenizer(self.model_file, self.version)
        try:
            request = ChatCompletionRequest.from_openai(
                messages=[dict(m) for m in messages], tools=[dict(t) for t in tools] if tools else None
            )
            tokens: list[int] = self._chat.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError, TypeError, KeyError) as e:
            raise ChatFormatError(f"messages cannot be encoded in the Mistral chat format: {e}") from e
        return tokens

    def decoder(self, context: Sequence[int] = ()) -> IncrementalDecoder:
        return IncrementalDecoder(self, context)

    def continuation(self, prompt: Sequence[int], ids: Sequence[int]) -> str:
        """The text `ids` add after `prompt` (with the leading space a decode of `ids` alone drops)."""
        before = self.decode(prompt)
        return self.decode([*prompt, *ids])[len(before) :]


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces whose concatenation is the full decode.

    SentencePiece drops the leading space of the first piece it decodes and byte-fallback pieces
    spell a character over several tokens, so a token cannot be decoded alone. Each step decodes a
    short window twice (without and with the new tokens) and emits the difference, holding text
    back while it ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        """`context`: the tokens before the stream (a prompt's last few), whose text is not emitted but
        lets the stream's first piece keep its leading space, as it has after the prompt."""
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)
        self._prefix = 0  # window start
        self._read = len(self.ids)  # tokens whose text has been emitted (or belongs to the context)

    def push(self, token_id: int) -> str:
        """Text newly completed by `token_id` (possibly empty)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a stream cut inside a multi-byte character)."""
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


def _version_of(model_file: Path, vocab_size: int) -> str:
    """Chat-format version: from a `.vN` suffix, else by vocabulary (32000 = v1, 32768 = v3)."""
    suffix = model_file.name.rsplit(".", 1)[-1]
    if suffix.startswith("v") and suffix[1:2].isdigit():
        return suffix
    return "v1" if vocab_size == 32000 else "v3"


def _chat_tokenizer(model_file: Path, version: str) -> Any:
    """mistral-common reads the version from the file name, so a bare `tokenizer.model` is
    presented to it under its versioned name through a symlink."""
    if model_file.name.endswith(f".{version}"):
        return MistralTokenizer.from_file(str(model_file))
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / f"tokenizer.model.{version}"
        link.symlink_to(model_file.resolve())
        return MistralTokenizer.from_file(str(link))
