"""Structured outputs: grammars compiled with llguidance, one matcher per choice in the engine.

Why llguidance (not xgrammar): it computes a token mask from its own lexer and Earley parser
without a precompile per tokenizer, builds JSON-schema grammars on the fly (no multi-second
compile for a large schema), takes Lark with `%json` and special tokens by id (`<[5]>`), which
is how a tool call's `[TOOL_CALLS]` token and its JSON arguments become one grammar, and has no
dependency on torch or a build step (one Rust wheel). vLLM and SGLang use it too, and mistral-
common builds its own tool-call grammars on it.

Where the state lives (DESIGN.md, structured outputs): a request's compiled grammar is made on
the caller's thread (`Grammars.compile`, cached by spec), never on the engine loop; the engine
keeps one matcher per choice beside its token history, advances it with every accepted token,
and sends the allowed-token bitmask of each constrained draw with the step. A preempted or
recomputed sequence keeps its matcher: the engine's tokens never roll back.

Shape legend: V = vocab, W = ceil(V / 32) words of a bitmask.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any, Literal

import llguidance as llg
from pydantic import BaseModel, ConfigDict

from model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

GRAMMAR_CACHE = 256  # compiled grammars kept (a schema sent with every request compiles once)
# Compact JSON, no free whitespace: a model (a random one above all) cannot wander off in spaces,
# and every output is the canonical shape clients parse.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

Kind = Literal["json", "regex", "choice", "lark"]


class StructuredOutput(BaseModel):
    """What a request's output must match: a JSON schema (as JSON text), a regex, one of some
    strings (`choice`: a JSON list of them), or a Lark grammar (llguidance's dialect)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    spec: str
    param: str = "response_format"  # the request field it came from, named in a refusal

    @classmethod
    def json_schema(cls, schema: dict[str, Any], param: str = "response_format") -> StructuredOutput:
        return cls(kind="json", spec=json.dumps(schema), param=param)  # property order is kept: it is the output's


class GrammarError(ValueError):
    """A grammar that cannot be compiled; `param` names the request field it came from."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class Grammar:
    """A compiled grammar: matchers for it are copies of one, made at no compile cost."""

    def __init__(self, matcher: llg.LLMatcher, spec: StructuredOutput) -> None:
        self._template = matcher
        self.spec = spec

    def matcher(self) -> llg.LLMatcher:
        return self._template.deep_copy()


class Grammars:
    """The llguidance view of a tokenizer, and compiled grammars by spec (LRU, thread-safe)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.ll = llg.LLTokenizer(llg.TokenizerWrapper(_SentencePieceVocab(tokenizer)), n_vocab=vocab_size)
        self._cache: OrderedDict[StructuredOutput, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput) -> Grammar:
        """The grammar of `spec`; `GrammarError` naming its field for one that cannot be compiled."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        grammar = Grammar(self._matcher(spec), spec)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > GRAMMAR_CACHE:
                self._cache.popitem(last=False)
        return grammar

    def _matcher(self, spec: StructuredOutput) -> llg.LLMatcher:
        source = _grammar_source(spec)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(source, self.ll)
        if is_error:
            raise GrammarError(f"{spec.param}: the grammar cannot be compiled: {messages[0]}", spec.param)
        matcher = llg.LLMatcher(self.ll, source, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{spec.param}: the grammar cannot be compiled: {matcher.get_error()}", spec.param)
        return matcher


def bitmask(matcher: llg.LLMatcher) -> bytes:
    """The matcher's allowed next tokens: W little-endian int32 words, bit i of word w = token 32w + i."""
    return bytes(matcher.compute_bitmask())


def _grammar_source(spec: StructuredOutput) -> str:
    if spec.kind == "json":
        try:
            schema = json.loads(spec.spec)
        except json.JSONDecodeError as e:
            raise GrammarError(f"{spec.param}: not JSON: {e}", spec.param) from e
        if not isinstance(schema, dict):
            raise GrammarError(f"{spec.param}: a JSON schema is an object", spec.param)
        return str(llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS))  # type: ignore[arg-type]
    if spec.kind == "regex":
        return str(llg.LLMatcher.grammar_from_regex(spec.spec))
    if spec.kind == "choice":
        options = json.loads(spec.spec)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError(f"{spec.param}: choices are a non-empty list of non-empty strings", spec.param)
        return str(llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options)))
    return str(llg.LLMatcher.grammar_from_lark(spec.spec))


def tool_call_grammar(tools: list[dict[str, Any]], name: str | None, parallel: bool, tool_calls_id: int) -> str:
    """A Lark grammar (llguidance's) of the Mistral v3 tool-call syntax: the `[TOOL_CALLS]` token,
    then a JSON list of `{"name", "arguments"}` objects whose arguments follow each function's
    `parameters` schema; only the function `name` when given, exactly one call unless `parallel`."""
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1, "x-guidance": JSON_OPTIONS}
    if not parallel:
        schema["maxItems"] = 1
    return f'start: <[{tool_calls_id}]> " " calls\ncalls: %json {json.dumps(schema)}\n'


class _SentencePieceVocab:
    """A SentencePiece vocabulary as llguidance's `TokenizerWrapper` reads it: each id's bytes
    (control pieces named `<...>`, as llguidance expects special tokens), and an encoder that does
    not add SentencePiece's leading space to the text it is given."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        sp = tokenizer.sp
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if sp.is_control(i) or sp.is_unknown(i)]
        self.tokens: list[bytes] = []
        for i in range(tokenizer.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i):
                piece = str(sp.id_to_piece(i))
                self.tokens.append((f"<{piece[1:-1]}>" if piece.startswith("[") else piece).encode())
            else:
                self.tokens.append(tokenizer.token_bytes(i))
        self._newline = sp.encode("\n")  # what encode("\n" + s) starts with: ["▁", "<0x0A>"]

    def __call__(self, s: str) -> list[int]:
        ids: list[int] = self._tokenizer.sp.encode("\n" + s)
        n = len(self._newline)
        return ids[n:] if ids[:n] == self._newline else self._tokenizer.sp.encode(s)
