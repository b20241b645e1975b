"""What a request's choices have produced: each accepted token into its text (detokenised
incrementally, checked against the grammar and the stop rules) and the delta each report carries.

The engine owns the requests' lifecycle (queueing, forking choices, finishing them on the
scheduler); `OutputProcessor` owns their outputs: `accept` takes one sampled token and says
whether (and why) the choice is done, `report` builds the `RequestOutput` since the last one,
holding back text that may be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.engine.request import FinishReason, RequestFailed, RequestOutput, SamplingParams
from cluster.engine.sequence import Sequence as SchedSeq
from cluster.engine.structured import Grammar
from model.sampling import DrawParams
from model.tokenizer import IncrementalDecoder, Tokenizer
from protocol.step import Draw, Sampled, TokenLogprobs

DECODE_CONTEXT = 4  # prompt tokens a text decoder starts from (enough for a word's leading space)


@dataclass
class Choice:
    """One choice of a request: its sequence and the text and logprobs reported so far."""

    seq: SchedSeq
    index: int
    decoder: IncrementalDecoder | None  # None: the model has no tokenizer, its text stays empty
    matcher: Any = None  # llguidance.LLMatcher of a constrained request: advanced with each accepted token
    text: str = ""
    emitted: int = 0  # characters of text already reported
    emitted_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)

    def push(self, token: int) -> str:
        return self.decoder.push(token) if self.decoder is not None else ""

    def flush(self) -> str:
        return self.decoder.flush() if self.decoder is not None else ""


@dataclass
class RequestState:
    """A request in the engine: its choices (live ones by index), those still to fork from choice 0
    once its prompt is computed, and its scored prompt."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    choices: dict[int, Choice]  # live choices by index
    pending: list[Draw]  # choices still to fork from choice 0 once its prompt is computed
    unfinished: int  # choices not done, pending ones included
    draw: DrawParams  # `params.draw_params()`, what each draw's chunk carries
    grammar: Grammar | None = None
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=lambda: [None])

    def drop_pending(self) -> None:
        """The choices not yet forked will never be: they no longer count as unfinished."""
        self.unfinished -= len(self.pending)
        self.pending = []


class OutputProcessor:
    """Sampled tokens into text and finish reasons, and the reports of what is new."""

    def __init__(self, tokenizer: Tokenizer | None, eos_id: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.max_model_len = max_model_len

    def decoder(self, prompt: Sequence[int]) -> IncrementalDecoder | None:
        """A choice's text decoder, with the prompt's last tokens as context so the first generated
        piece keeps its leading space ("The capital of France is" + " Paris")."""
        return self.tokenizer.decoder(prompt[-DECODE_CONTEXT:]) if self.tokenizer is not None else None

    def accept(self, req: RequestState, choice: Choice, s: Sampled) -> FinishReason | None:
        """Append the sampled token (and its logprobs) to `choice`; why it is done now, if it is.
        `RequestFailed` if the token breaks the choice's grammar."""
        seq, params = choice.seq, req.params
        assert s.token is not None
        seq.output.append(s.token)
        if s.logprobs is not None:
            choice.logprobs.append(s.logprobs)
        if s.token in params.stop_token_ids or (s.token == self.eos_id and not params.ignore_eos):
            choice.text += choice.flush()
            return "stop"
        if choice.matcher is not None and not choice.matcher.consume_token(s.token):
            raise RequestFailed(f"token {s.token} breaks the grammar: {choice.matcher.get_error()}")
        choice.text += choice.push(s.token)
        stops = params.stop if len(seq.output) >= params.min_tokens else []
        cut = _first_stop(choice.text, stops, max(0, choice.emitted - _longest(stops)))
        if choice.matcher is not None and choice.matcher.is_stopped():  # the grammar is complete
            choice.text += choice.flush()
            return "stop"
        if cut is not None:
            choice.text = choice.text[:cut]
            return "stop"
        if len(seq.output) >= params.max_tokens or len(seq.tokens) >= self.max_model_len:
            choice.text += choice.flush()
            return "length"
        return None

    def report(self, req: RequestState, choice: Choice, reason: FinishReason | None = None) -> RequestOutput:
        """The delta since the last report; while the choice runs, text that may be the start of a
        stop string stays back (all of it goes out with the last report)."""
        hold = _longest(req.params.stop) - 1
        visible = len(choice.text) if reason is not None else max(choice.emitted, len(choice.text) - max(hold, 0))
        new_text = choice.text[choice.emitted : visible]
        choice.emitted = visible
        new_tokens = choice.seq.output[choice.emitted_tokens :]
        choice.emitted_tokens = len(choice.seq.output)
        scored = req.params.prompt_logprobs is not None and len(req.prompt_logprobs) == len(req.prompt)
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt,
            token_ids=list(choice.seq.output),
            text=choice.text[:visible],
            new_token_ids=new_tokens,
            new_text=new_text,
            finished=reason is not None,
            finish_reason=reason,
            logprobs=list(choice.logprobs) if req.params.logprobs is not None else None,
            index=choice.index,
            request_finished=req.unfinished == 0,
            prompt_logprobs=req.prompt_logprobs if scored else None,  # complete: no longer appended to
            cached_tokens=req.choices[0].seq.cached_tokens if 0 in req.choices else 0,
        )


def _longest(stops: Sequence[str]) -> int:
    return max((len(s) for s in stops), default=0)


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Index where the earliest stop string begins in text[start:], if any."""
    hits = [i for s in stops if s and (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
