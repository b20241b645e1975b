"""The real Mistral tokenizers: raw text, chat format, streaming decode."""

from __future__ import annotations

import shutil

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from model import Tokenizer
from model.tokenizer import DEFAULT_TOKENIZER, ChatFormatError

pytestmark = pytest.mark.unit

UNICODE_TEXTS = [
    "Hello world",
    "  two leading spaces, two trailing  ",
    "Grüße aus Köln — ça va? Señor Müller zahlt 12,50 €.",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 🦀🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "ελληνικά, русский, العربية, עברית, हिन्दी",
    "tabs\tand\nnew\n\nlines\r\n and   runs    of spaces",
    "code: def f(x):\n    return x ** 2  # 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Café ☕ ou thé 🍵 ?"},
    ],
]


def mistral_common_messages(messages: list[dict[str, str]]) -> list:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    return [kinds[m["role"]](content=m["content"]) for m in messages]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


def test_default_is_the_mixtral_8x22b_v3_tokenizer(tok: Tokenizer) -> None:
    assert tok.vocab_size == 32768 and tok.version == "v3"
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.sp.id_to_piece(3) == "[INST]" and tok.sp.id_to_piece(4) == "[/INST]"
    assert tok.encode("Hello", bos=True, eos=True) == [1, 23325, 2]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_decode_encode_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_streamed_pieces_concatenate_to_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, eos=True)
    dec = tok.decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    if len(text) > 12:
        assert sum(1 for p in pieces if p) > 3  # text really streams, it is not all held to the end


def test_stream_cut_inside_a_character_is_flushed(tok: Tokenizer) -> None:
    ids = tok.encode("🦀", bos=False)
    assert len(ids) > 1  # byte-fallback pieces
    dec = tok.decoder()
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.flush() == tok.decode(ids[:-1])


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_encoding_equals_mistral_common(tok: Tokenizer, messages: list[dict[str, str]]) -> None:
    reference = MistralTokenizer.from_file(str(DEFAULT_TOKENIZER))
    request = ChatCompletionRequest(messages=mistral_common_messages(messages))
    assert tok.encode_chat(messages) == reference.encode_chat_completion(request).tokens


def test_chat_format_layout(tok: Tokenizer) -> None:
    """The v3 layout, spelled out: <s>[INST] user[/INST] answer</s>[INST] user[/INST]."""
    ids = tok.encode_chat(CONVERSATIONS[1])
    inst, end_inst = 3, 4
    expected = (
        [tok.bos_id, inst, *tok.encode("What is 2+2?", bos=False), end_inst]
        + [*tok.encode("4.", bos=False), tok.eos_id]
        + [inst, *tok.encode("And 3+3?", bos=False), end_inst]
    )
    assert ids == expected


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "assistant", "content": "first"}], [{"role": "wizard", "content": "x"}], [{"content": "x"}]],
)
def test_bad_conversations_raise_chat_format_error(tok: Tokenizer, messages) -> None:
    with pytest.raises(ChatFormatError, match="Mistral chat format"):
        tok.encode_chat(messages)


def test_checkpoint_tokenizer_wins(tmp_path) -> None:
    v1 = DEFAULT_TOKENIZER.parent / "tokenizer.model.v1"
    shutil.copy(v1, tmp_path / "tokenizer.model")
    own = Tokenizer.for_checkpoint(tmp_path, 32768)  # its own, whatever the vocabulary
    assert own.vocab_size == 32000 and own.version == "v1"
    reference = MistralTokenizer.from_file(str(v1))
    request = ChatCompletionRequest(messages=mistral_common_messages(CONVERSATIONS[1]))
    assert own.encode_chat(CONVERSATIONS[1]) == reference.encode_chat_completion(request).tokens


def test_without_its_own_the_shipped_tokenizer_of_the_models_vocabulary(tmp_path) -> None:
    v1, v3 = Tokenizer.for_checkpoint(tmp_path, 32000), Tokenizer.for_checkpoint(tmp_path, 32768)
    assert v1 is not None and (v1.vocab_size, v1.version) == (32000, "v1")  # Mixtral 8x7B
    assert v3 is not None and (v3.vocab_size, v3.version) == (32768, "v3")  # Mixtral 8x22B Instruct
    assert Tokenizer.for_checkpoint(tmp_path, 512) is None
    assert "tokenizer.model" in Tokenizer.missing(tmp_path, 512) and "32000: v1" in Tokenizer.missing(tmp_path, 512)


def test_ids_past_the_pieces_decode_to_nothing(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world", bos=False)
    assert tok.decode([*ids, tok.vocab_size, tok.vocab_size + 5]) == tok.decode(ids) == "Hello world"
