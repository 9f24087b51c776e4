"""Per-request state: tokens, stop conditions, incremental text, and speculation stats.

Convention: the cache holds the prompt and every emitted token but the last one, `cur`, whose KV
is written by the next forward. Emitted tokens go through `emit()`, which applies the stop
conditions in order (EOS, max new tokens, context limit, stop strings) and drops what follows.
Text is streamed without ever splitting a UTF-8 character, and text that might be the start of a
stop string is held back until it is known not to be one.

Detokenization is incremental: each step decodes only the tokens after the last complete character,
together with the chunk before them (so a decoder whose output depends on the neighbouring token, such as
SentencePiece's leading space, gives the text of a full decode), instead of the whole output every step,
the same scheme as vLLM's and TGI's detokenizers. `tokenizers.decoders.DecodeStream` does this too, but it
hides the incomplete tail, which the stop-string check needs to stop on the token a full decode stops on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from models.engine.config import SamplingParams, SpecStats

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


@dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since the previous output of this request
    token_ids: list[int]  # new tokens since the previous output
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string), "length", "cancelled"
    prompt_tokens: int
    completion_tokens: int
    stats: dict  # a snapshot of SpecStats.to_dict()
    cached_tokens: int  # prompt tokens served from the prefix cache
    logprobs: list[dict] | None = None  # per new token: {"token_id", "logprob", "top": [[id, logprob], ...]}
    timings: dict[str, int] | None = None  # on the last output: phase -> time.time_ns() (see Sequence.timings)
    hidden: torch.Tensor | None = None  # on the last output, with EngineConfig.record_hidden: [L - 1, H] bf16


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    method: str
    k: int
    eos_id: int | None
    max_context: int
    tokenizer: object
    generator: torch.Generator | None = None
    tenant: str = "default"  # namespaces the prefix cache
    auto: bool = False  # method `auto`: the planner set `method` at admission and sets k each iteration
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    slot: int = -1
    prefilled: int = 0  # prompt tokens whose KV is in the cache
    output_ids: list[int] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)  # pending drafts (sdsat-fused, two-step)
    draft_probs: torch.Tensor | None = None  # [len(drafts), V] q, None for point-mass drafts
    k_plan: int = 0  # this iteration's draft length before the drafter's own limit (lookup: a match)
    k_now: int = 0  # this iteration's draft length (after the load policy and the limits)
    hidden: torch.Tensor | None = None  # mlp: the base model's final state [H] where cur was predicted
    hidden_trace: list[torch.Tensor] | None = None  # record_hidden: the states of every processed position
    finished: bool = False
    finish_reason: str | None = None
    stopped_by_string: bool = False
    text: str = ""
    stats: SpecStats = field(default_factory=SpecStats)
    logprobs: list[dict] = field(default_factory=list)
    # when each phase ended (time.time_ns(), for tracing): queued, admitted, prefix_lookup, prefill, finished
    timings: dict[str, int] = field(default_factory=lambda: {"queued": time.time_ns()})
    _sent_tokens: int = 0
    _sent_chars: int = 0
    _prefix_at: int = 0  # output_ids[_prefix_at:_read_at] decoded to the end of `text` (its last chunk)
    _read_at: int = 0  # output_ids before it are in `text`; after it, the tail that may end mid-character

    @property
    def cur(self) -> int:
        return self.output_ids[-1]

    @property
    def context_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens this sequence may still emit (max_new_tokens and the context limit)."""
        return max(0, min(self.params.max_new_tokens - len(self.output_ids), self.max_context - self.context_len))

    def uniforms(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator)

    def emit(self, tokens: list[int], logits: torch.Tensor | None = None) -> int:
        """Append tokens until a stop condition; returns how many were kept. logits: [len(tokens), V],
        the target logits each token was chosen from (for reported log-probabilities)."""
        kept = 0
        if self.params.logprobs is not None and logits is not None:
            self._record_logprobs(tokens, logits)
        for token in tokens:
            if self.finished:
                break
            self.output_ids.append(token)
            kept += 1
            if token == self.eos_id and not self.params.ignore_eos:
                self._finish("stop")
            elif self.params.stop and self._hit_stop_string():
                self.stopped_by_string = True
                self._finish("stop")
            elif self.remaining == 0:
                self._finish("length")
        self.stats.emitted += kept
        del self.logprobs[len(self.output_ids) :]
        return kept

    def _record_logprobs(self, tokens: list[int], logits: torch.Tensor) -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)  # the model's own distribution, before sampling filters
        top = logp.topk(self.params.logprobs, dim=-1) if self.params.logprobs else None
        for i, token in enumerate(tokens):
            alts = [[int(t), float(v)] for v, t in zip(top.values[i], top.indices[i], strict=True)] if top else []
            self.logprobs.append({"token_id": token, "logprob": float(logp[i, token]), "top": alts})

    def cancel(self) -> None:
        self._finish("cancelled")

    def _finish(self, reason: str) -> None:
        self.finished, self.finish_reason = True, reason

    def _text_ids(self) -> list[int]:
        """The output ids that make up the text: all but a final EOS."""
        ids = self.output_ids
        return ids[:-1] if ids and ids[-1] == self.eos_id and not self.params.ignore_eos else ids

    def _tail(self) -> str:
        """Text of the tokens not yet in `text`. When it ends on a complete character it joins `text` (and ""
        is returned); otherwise it is returned, and `text` + it is what a full decode would give."""
        ids = self._text_ids()
        if len(ids) == self._read_at:
            return ""
        decode = self.tokenizer.decode
        before = decode(ids[self._prefix_at : self._read_at], skip_special_tokens=False)
        now = decode(ids[self._prefix_at :], skip_special_tokens=False)
        if now.startswith(before):
            tail = now[len(before) :]
        else:  # a decoder that rewrites earlier text given later tokens: fall back to a full decode
            full = decode(ids, skip_special_tokens=False)
            self.text, tail = full[: len(self.text)], full[len(self.text) :]
        if tail.endswith(REPLACEMENT):  # an incomplete UTF-8 character: wait for its other bytes
            return tail
        self.text += tail
        self._prefix_at, self._read_at = self._read_at, len(ids)
        return ""

    def _hit_stop_string(self) -> bool:
        # only text after what the previous check saw (less a stop string's length) can hold a new hit
        tail_from = max(0, len(self.text) - max(map(len, self.params.stop)))
        tail = self._tail()  # first: it may move complete text into self.text
        text = self.text + tail
        hits = [i for s in self.params.stop if (i := text.find(s, tail_from)) >= 0]
        if hits:
            self.text = text[: min(hits)]
        return bool(hits)

    def take_output(self) -> RequestOutput | None:
        """What is new since the previous call (None if nothing is), for streaming."""
        text = self.text
        if not self.stopped_by_string:  # else the text already ends right before the stop string
            tail = self._tail()
            if self.finished:  # nothing more will complete it
                self.text = text = self.text + tail
                self._prefix_at, self._read_at = self._read_at, len(self._text_ids())  # all of it is in text now
            else:  # the tail's complete characters may go out; its incomplete last one may not
                text = self.text + tail.rstrip(REPLACEMENT)
        safe = len(text)
        if not self.finished and self.params.stop:  # hold back what could still become a stop string
            safe = max(self._sent_chars, safe - (max(map(len, self.params.stop)) - 1))
        new_tokens = self.output_ids[self._sent_tokens :]
        if safe <= self._sent_chars and not new_tokens and not self.finished:
            return None
        if self.finished:
            self.timings.setdefault("finished", time.time_ns())
        out = RequestOutput(
            self.request_id, text[self._sent_chars : safe], new_tokens, self.finished, self.finish_reason,
            len(self.prompt_ids), len(self.output_ids), {"method": self.method, **self.stats.to_dict()},
            self.cached_tokens,
            self.logprobs[self._sent_tokens :] if self.params.logprobs is not None else None,
            dict(self.timings) if self.finished else None,
            # a stop inside an accepted run leaves states past the last kept token: the output has L - 1
            torch.cat(self.hidden_trace)[: self.context_len - 1] if self.finished and self.hidden_trace is not None
            else None,
        )
        self._sent_chars = max(self._sent_chars, safe)
        self._sent_tokens = len(self.output_ids)
        return out
