"""The requests' choices and what they produce: the request table, forking a request's choices
from choice 0 once its prompt is computed, each sampled token into its choice's text (detokenised
incrementally, checked against the grammar and the stop rules), finishing and failing choices,
and the delta each report carries.

The engine schedules and steps; after each step it hands the processor the step's chunks and
sampled tokens (`process`) and gets the reports. What a choice's sequence needs of the scheduler
(a fork's own sequence, the release of a finished one) the processor asks of the engine through
`Sequences`, so the scheduler and the shards' block tables stay the engine's alone. `accept`
takes one sampled token and says whether (and why) the choice is done; `report` builds the
`RequestOutput` since the last one, holding back text that may be the start of a stop string.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster.engine.request import CheckedRequest, FinishReason, RequestFailed, RequestOutput, SamplingParams
from cluster.engine.sequence import Sequence as SchedSeq
from cluster.engine.structured import Grammar
from model.sampling import DrawParams
from model.tokenizer import IncrementalDecoder, Tokenizer
from protocol.step import Draw, Sampled, TokenLogprobs

logger = logging.getLogger(__name__)

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


class Sequences(Protocol):
    """What the output processor asks of the engine for a choice's sequence."""

    def fork_sequence(self, seq: SchedSeq, seq_id: str) -> SchedSeq:
        """A new choice's sequence, sharing `seq`'s computed prompt."""
        ...

    def release_sequence(self, seq: SchedSeq) -> None:
        """A finished (or aborted) choice's sequence: its blocks go, its shard drops it."""
        ...


class OutputProcessor:
    """The requests in the engine and their choices; sampled tokens into text, finish reasons and
    the reports of what is new."""

    def __init__(self, tokenizer: Tokenizer | None, eos_id: int, max_model_len: int, sequences: Sequences) -> None:
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.max_model_len = max_model_len
        self.sequences = sequences
        self.requests: dict[str, RequestState] = {}
        self.choices: dict[str, tuple[RequestState, Choice]] = {}  # by sequence id

    # ---- the request table -------------------------------------------------------------------

    def in_use(self, request_id: str, n: int) -> bool:
        """Whether a request `request_id` with `n` choices would take an id in use."""
        ids = [request_id] + [choice_id(request_id, i) for i in range(1, n)]
        return request_id in self.requests or any(c in self.choices for c in ids)

    def add(self, request_id: str, request: CheckedRequest, seq: SchedSeq, grammar: Grammar | None) -> None:
        """A request whose choice 0 runs as `seq`; its other choices fork from it later."""
        params, prompt = request.params, request.prompt
        forks = [Draw(choice_id(request_id, i), None if params.seed is None else params.seed + i)
                 for i in range(1, params.n)]  # fmt: skip
        first = Choice(seq, 0, self.decoder(prompt), grammar.matcher() if grammar is not None else None)
        req = RequestState(request_id, list(prompt), params, {0: first}, forks, params.n, params.draw_params(), grammar)
        self.requests[request_id] = req
        self.choices[request_id] = (req, first)

    def process(self, steps: list[tuple[SchedSeq, int, int]], results: dict[str, Sampled]) -> list[RequestOutput]:
        """A step's results: for each (sequence, start, end) it ran, its sampled token (or scored
        prompt) into its choice; the reports of every choice that changed."""
        outputs = []
        for seq, start, end in steps:
            entry = self.choices.get(seq.request_id)
            sampled = results.get(seq.request_id)
            if entry is not None and sampled is not None:
                outputs += self._apply(*entry, start, end, sampled, results)
        return outputs

    def abort(self, request_id: str) -> list[RequestOutput]:
        """End a request, every choice of it, now."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        req.drop_pending()
        return [self._finish(req, choice, "abort") for choice in list(req.choices.values())]

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with `error` (the backend is gone)."""
        outs = []
        for req in list(self.requests.values()):
            req.drop_pending()
            for choice in list(req.choices.values()):
                out = self._finish(req, choice, "abort")
                out.error, out.engine_failed = error, True
                outs.append(out)
        return outs

    def _apply(
        self, req: RequestState, choice: Choice, start: int, end: int, s: Sampled, results: dict[str, Sampled]
    ) -> list[RequestOutput]:
        """A step's result into its choice; a failure of this one choice ends it alone."""
        if s.error is not None:
            return [self._fail(req, choice, s.error)]
        try:
            if s.prompt_logprobs is not None:
                self._record_prompt_logprobs(req, start, s.prompt_logprobs)
            if s.token is None:  # a scored prompt chunk; the last one of a scoring-only request ends it
                done = req.params.max_tokens == 0 and end == len(req.prompt)
                return [self._finish(req, choice, "length")] if done else []
            forked = self._fork(req, choice, results) if choice.index == 0 and req.pending else []
            return [*forked, self._take(req, choice, s)]
        except Exception as e:  # detokenising or stop checks of this request
            logger.exception("request %s failed after a step", req.request_id)
            return [self._fail(req, choice, f"{type(e).__name__}: {e}")]

    def _fork(self, req: RequestState, first: Choice, results: dict[str, Sampled]) -> list[RequestOutput]:
        """Choice 0's prompt is computed and each pending choice drew its first token from the same
        logits: give each its own sequence, sharing the prompt's blocks."""
        outputs = []
        for i, draw in enumerate(req.pending, start=1):
            s = results[draw.request_id]
            seq = self.sequences.fork_sequence(first.seq, draw.request_id)
            matcher = first.matcher.deep_copy() if first.matcher is not None else None  # before it takes a token
            choice = Choice(seq, i, self.decoder(req.prompt), matcher)
            req.choices[i] = choice
            self.choices[draw.request_id] = (req, choice)
            outputs.append(self._fail(req, choice, s.error) if s.error else self._take(req, choice, s))
        req.pending = []
        return outputs

    def _take(self, req: RequestState, choice: Choice, s: Sampled) -> RequestOutput:
        """A sampled token into its choice: the choice's report, its last if the token ends it."""
        reason = self.accept(req, choice, s)
        return self._finish(req, choice, reason) if reason is not None else self.report(req, choice)

    def _record_prompt_logprobs(self, req: RequestState, start: int, scored: list[TokenLogprobs]) -> None:
        """The chunk starting at `start` scored positions start+1, start+2, ...; keep the prompt's,
        once each (a recomputed chunk scores them again)."""
        for position, entry in enumerate(scored, start=start + 1):
            if position == len(req.prompt_logprobs) and position < len(req.prompt):
                req.prompt_logprobs.append(entry)

    def _fail(self, req: RequestState, choice: Choice, error: str) -> RequestOutput:
        logger.warning("request %s (choice %d) failed: %s", req.request_id, choice.index, error)
        if choice.index == 0:  # the pending choices would fork from it
            req.drop_pending()
        out = self._finish(req, choice, "abort")
        out.error = f"request {req.request_id} failed: {error}"
        return out

    def _finish(self, req: RequestState, choice: Choice, reason: FinishReason) -> RequestOutput:
        self.sequences.release_sequence(choice.seq)
        del self.choices[choice.seq.request_id]
        req.unfinished -= 1
        out = self.report(req, choice, reason)
        del req.choices[choice.index]
        if req.unfinished == 0:
            del self.requests[req.request_id]
        return out

    # ---- one choice's tokens and text --------------------------------------------------------

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


def choice_id(request_id: str, index: int) -> str:
    """The sequence id of a request's choice `index` > 0 (choice 0's is the request's own)."""
    return f"{request_id}#choice{index}"


def _longest(stops: Sequence[str]) -> int:
    return max((len(s) for s in stops), default=0)


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Index where the earliest stop string begins in text[start:], if any."""
    hits = [i for s in stops if s and (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
