"""One completion's text as its tokens arrive: incremental detokenising, stop strings, and `omni-fast infer`'s strip.

The final text is `tokenizer.decode(ids, skip_special_tokens=True)`, cut before the first stop string, then
stripped: exactly what `omni-fast infer` prints when there is no stop string. While tokens arrive, the new text
is decoded from a short window of ids (vLLM's prefix/read offsets: the window starts where the previous piece
ended on a whole character, and the text of its first ids is subtracted, so a tokenizer's handling of a
word's first piece cannot differ from the whole decode), never the whole sequence per token. A piece is held
back while it ends in an incomplete UTF-8 character, in whitespace (it may be the end, which strip removes), or
within the longest stop string's length of the end (it may be the start of one). `finish()` decodes the whole
sequence once and sends what is left, so the pieces always add up to the final text when the window decoding
agrees with the whole (byte-level BPE tokenizers such as Qwen's); where it would not, the final text wins and
the difference is logged.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)
INCOMPLETE = "\ufffd"  # what a tokenizer decodes a partial UTF-8 sequence to


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the earliest occurrence of any stop string in text[start:] (None: none)."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


class TextStream:
    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # chars that may be a stop string's start
        self.ids: list[int] = []  # the ids that count: up to the one that completed a stop string, else all
        self.raw = ""  # decoded text so far (whole characters), cut at a stop string
        self.sent = ""  # the text handed out so far: a prefix of the final text
        self.stopped = False  # a stop string matched; later tokens are ignored
        self._prefix = self._read = 0  # the decode window: ids[_prefix:_read] is text already in self.raw

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> str:
        """New token ids -> the text that can be sent now ("" while it is held back)."""
        for token in ids:
            if self.stopped:
                break
            self.ids.append(token)
            before = self._decode(self.ids[self._prefix:self._read])
            after = self._decode(self.ids[self._prefix:])
            if len(after) <= len(before) or after.endswith(INCOMPLETE):
                continue
            searched = max(0, len(self.raw) - self.hold)
            self.raw += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            cut = find_stop(self.raw, self.stops, searched) if self.stops else None
            if cut is not None:
                self.raw, self.stopped = self.raw[:cut], True
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        text = self.raw.strip() if final else self.raw[: len(self.raw) - (0 if self.stopped else self.hold)]
        text = text if final else text.lstrip().rstrip()
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self) -> str:
        """The rest of the text once the completion has ended: the whole sequence decoded once, cut at the first
        stop string, stripped. Afterwards `self.sent` is the completion's final text."""
        text = self._decode(self.ids)
        cut = find_stop(text, self.stops) if self.stops else None
        final = (text if cut is None else text[:cut]).strip()
        if not final.startswith(self.sent):
            log.warning("streamed text %.40r... is not a prefix of the decoded completion %.40r...; the response's "
                        "text is the decoded one", self.sent, final)
            self.sent = final
            return ""
        delta, self.sent = final[len(self.sent):], final
        return delta
