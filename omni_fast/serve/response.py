"""A request's engine outputs -> its choices: text as it streams, finish reasons, the parsed emotion and reasoning,
log-probabilities, usage; and the chat.completion / chat.completion.chunk bodies built from them.

A choice ends at a stop string (finish_reason "stop", its text cut before the string), or when the engine
finishes the request (each sample's Completion gives "stop" for an EOS id, "length" for max_tokens). The
emotion and reasoning are parsed from the final text by the task's one parser (omni_fast.task.parse_response).
"""
from __future__ import annotations

import time

from omni_fast.task import parse_response
from omni_fast.serve.protocol import (ChatCompletion, ChatCompletionChunk, ChatMessage, Choice, ChoiceLogprobs,
                                      ChunkChoice, Delta, PromptTokensDetails, Timings, TokenLogprob, Usage)
from omni_fast.serve.text import TextStream


class ChoiceState:
    def __init__(self, index: int, tokenizer, stops: tuple[str, ...]):
        self.index = index
        self.text = TextStream(tokenizer, stops)
        self.finish_reason: str | None = None  # set once the choice has ended
        self.logprobs: list[float] | None = None  # the sampled tokens' log-probs, once the engine finished

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None or self.text.stopped


class Outputs:
    def __init__(self, request_id: str, model_name: str, n: int, tokenizer, stops: tuple[str, ...],
                 logprobs: bool = False):
        self.id, self.model, self.tokenizer, self.want_logprobs = request_id, model_name, tokenizer, logprobs
        self.created = int(time.time())
        self.choices = [ChoiceState(i, tokenizer, stops) for i in range(n)]
        self.prompt_tokens = 0  # set when the request starts
        self.cached_tokens = 0  # of them, read from the engine's prefix cache (RequestOutput.num_cached_tokens)
        self.timings: Timings | None = None  # set when the request has ended

    # --- feeding -------------------------------------------------------------------------------------------------
    def add(self, new_token_ids: list[list[int]]) -> dict[int, str]:
        """One step's new ids per sample -> the text each choice can send now (choices with none left out)."""
        deltas = {}
        for choice, ids in zip(self.choices, new_token_ids):
            if ids and not choice.ended:
                delta = choice.text.add(ids)
                if delta:
                    deltas[choice.index] = delta
        return deltas

    @property
    def all_stopped(self) -> bool:
        """Every choice ended at a stop string: the engine's request can be aborted (its tokens are not needed,
        unless log-probs are, which come with the engine's completions)."""
        return all(c.text.stopped for c in self.choices) and not self.want_logprobs

    def finish(self, completions: list | None) -> dict[int, str]:
        """The request ended (completions: the engine's n Completions; None when it was cut short because every
        choice hit a stop string) -> each choice's last text."""
        deltas = {}
        for i, choice in enumerate(self.choices):
            done = completions[i] if completions else None
            if done is not None and not choice.text.stopped:
                deltas[i] = choice.text.add(done.token_ids[len(choice.text.ids):])  # ids no step reported
            deltas[i] = deltas.get(i, "") + choice.text.finish()
            choice.finish_reason = "stop" if choice.text.stopped or done is None else done.finish_reason
            if done is not None and self.want_logprobs:
                choice.logprobs = done.logprobs[: len(choice.text.ids)].tolist()
        return deltas

    # --- bodies --------------------------------------------------------------------------------------------------
    @property
    def usage(self) -> Usage:
        generated = sum(len(c.text.ids) for c in self.choices)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=generated,
                     total_tokens=self.prompt_tokens + generated,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))

    def _logprobs(self, choice: ChoiceState) -> ChoiceLogprobs | None:
        if choice.logprobs is None:
            return None
        out = []
        for token, lp in zip(choice.text.ids, choice.logprobs):
            text = self.tokenizer.decode([token])
            out.append(TokenLogprob(token=text, logprob=lp, bytes=list(text.encode())))
        return ChoiceLogprobs(content=out)

    def completion(self) -> ChatCompletion:
        choices = []
        for c in self.choices:
            reasoning, emotion = parse_response(c.text.sent)
            choices.append(Choice(index=c.index, message=ChatMessage(content=c.text.sent),
                                  finish_reason=c.finish_reason, logprobs=self._logprobs(c), emotion=emotion,
                                  reasoning=reasoning))
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage,
                              timings=self.timings)

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None,
               timings: Timings | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage,
                                   timings=timings)

    def role_chunks(self) -> list[ChatCompletionChunk]:
        return [self._chunk([ChunkChoice(index=c.index, delta=Delta(role="assistant", content=""))])
                for c in self.choices]

    def delta_chunks(self, deltas: dict[int, str]) -> list[ChatCompletionChunk]:
        return [self._chunk([ChunkChoice(index=i, delta=Delta(content=text))]) for i, text in deltas.items()]

    def final_chunks(self, deltas: dict[int, str], include_usage: bool) -> list[ChatCompletionChunk]:
        out = []
        for c in self.choices:
            reasoning, emotion = parse_response(c.text.sent)
            out.append(self._chunk([ChunkChoice(index=c.index, delta=Delta(content=deltas.get(c.index) or None),
                                                finish_reason=c.finish_reason, logprobs=self._logprobs(c),
                                                emotion=emotion, reasoning=reasoning)], timings=self.timings))
        if include_usage:
            out.append(self._chunk([], usage=self.usage))
        return out
