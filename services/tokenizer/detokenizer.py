"""Incremental detokenization of generated ids with TGIS stop-sequence matching and streaming hold-back.

TGIS semantics (spec §3.4): generated ids are decoded as a continuation of the
prompt, only whole characters and whole grapheme clusters are released (the
last cluster waits for the next token or the end), and stop sequences are
matched on the UTF-8 bytes of the generated text.  Nothing here touches sockets.
"""

from __future__ import annotations

from collections.abc import Sequence

import regex
from tokenizers import Tokenizer

from services.common.protocol import DetokDelta, DetokParams, StopReason

_GRAPHEME = regex.compile(r"\X")
_INCOMPLETE = "\ufffd"  # what decoding yields for a UTF-8 character whose bytes have not all arrived
_AS_IS = ("ByteLevel", "CTC")
_PLACEHOLDER_FIRST = ("Metaspace", "WordPiece", "Sequence")


class DetokenizationError(Exception):
    """The tokenizer's decoder cannot turn generated ids into continuation text."""


class TextDecoder:
    """Decodes windows of generated ids the way TGIS does for the tokenizer's decoder type."""

    def __init__(self, tokenizer: Tokenizer, seq2seq: bool = False) -> None:
        self.tokenizer = tokenizer
        self.seq2seq = seq2seq
        self.kind = type(tokenizer.decoder).__name__ if tokenizer.decoder is not None else None
        self._placeholder_id = tokenizer.encode("A", add_special_tokens=False).ids[0]
        self._placeholder = tokenizer.decode([self._placeholder_id], skip_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool, *, first: bool, last: bool) -> str:
        """Text of `ids` following earlier text (`first`: none came before; `last`: none will follow)."""
        if not ids:
            return ""
        if (first and self.seq2seq) or self.kind in _AS_IS or (last and self.kind == "BPEDecoder"):
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        # These decoders treat the first (or last) token of a sequence specially, e.g. dropping its
        # leading space; a placeholder token in that spot keeps the real tokens' text as in mid-sequence.
        if self.kind in _PLACEHOLDER_FIRST:
            text = self.tokenizer.decode([self._placeholder_id, *ids], skip_special_tokens=skip_special_tokens)
            if not text.startswith(self._placeholder):
                raise DetokenizationError("Unexpected")
            return text[len(self._placeholder) :]
        if self.kind == "BPEDecoder":
            text = self.tokenizer.decode([*ids, self._placeholder_id], skip_special_tokens=skip_special_tokens)
            if not text.endswith(self._placeholder):
                raise DetokenizationError("Unexpected")
            return text[: len(text) - len(self._placeholder)]
        if self.kind is None:
            return " " + self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        raise DetokenizationError(f"Unsupported tokenizer type: {self.kind}")

    def piece(self, token_id: int) -> str:
        """The raw vocabulary piece of `token_id` ("" if the vocabulary has none)."""
        return self.tokenizer.id_to_token(token_id) or ""


class _IncrementalText:
    """Turns ids into text one id at a time, releasing only complete characters.

    Prefix/read offsets as in vLLM's detokenize_incrementally: `_ids[:_read]` is
    text already released, kept as left context so that decoding the window
    and removing the context's text gives exactly the new text.
    """

    def __init__(self, decoder: TextDecoder, skip_special_tokens: bool) -> None:
        self._decoder = decoder
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0
        self._first = True  # the window still starts at the first generated id
        self._previous: int | None = None  # CTC: repeats of the previous id add nothing
        self._lagging: int | None = None  # BPE: the newest id, decoded once we know if it is the last

    def push(self, token_id: int) -> str:
        kind = self._decoder.kind
        if kind == "CTC":
            if token_id == self._previous:
                return ""
            self._previous = token_id
        if kind == "BPEDecoder":
            token_id, self._lagging = self._lagging, token_id
            if token_id is None:
                return ""
        self._ids.append(token_id)
        context = self._decode(self._ids[: self._read], last=False)
        text = self._decode(self._ids, last=False)
        if len(text) <= len(context) or text.endswith(_INCOMPLETE):
            return ""
        if self._read:
            del self._ids[: self._read]
            self._first = False
        self._read = len(self._ids)
        return text[len(context) :]

    def flush(self) -> str:
        """Whatever is still pending, without a trailing incomplete character."""
        if self._lagging is not None:
            self._ids.append(self._lagging)
            self._lagging = None
        context = self._decode(self._ids[: self._read], last=False)
        return self._decode(self._ids, last=True).rstrip(_INCOMPLETE)[len(context) :]

    def _decode(self, ids: list[int], last: bool) -> str:
        return self._decoder.decode(ids, self._skip, first=self._first, last=last)


class Detokenizer:
    """One request's generated text: incremental decoding, stop sequences and what may be released when.

    Text is released (returned in `DetokDelta.texts`) only once nothing can take
    it back.  Streaming: whole grapheme clusters except the last one, minus
    the longest stop sequence's length in bytes when a match would cut the
    stop sequence off (include_stop_sequence false).  Unary: everything at the
    end, since only the total is ever shown.
    """

    def __init__(self, decoder: TextDecoder, request_id: str, params: DetokParams) -> None:
        self.request_id = request_id
        self.params = params
        self.finished = False
        self._text = _IncrementalText(decoder, params.skip_special_tokens)
        self._stops = [s.encode() for s in params.stop_sequences if s]
        self._out = bytearray()  # all generated text decoded so far (whole characters only)
        self._released = 0  # bytes of `_out` already handed out
        cut_before_match = self._stops and not params.include_stop_sequence
        self._stop_hold = max(map(len, self._stops)) if cut_before_match else 0

    def feed(self, ids: Sequence[int], first_index: int, stop_reason: StopReason) -> DetokDelta:
        """Decode `ids` (generated indices first_index...); `stop_reason` set: the scheduler ended with the last one."""
        delta = DetokDelta(self.request_id, first_index, texts=[])
        ending = stop_reason != StopReason.NOT_FINISHED
        # The scheduler already stopped on the last id of an ending item: no stop-sequence check for it.
        for i, token_id in enumerate(ids[:-1] if ending else ids):
            start = len(self._out)
            self._out += self._text.push(token_id).encode()
            if len(self._out) > start and self._stops and first_index + i + 1 >= self.params.min_new_tokens:
                match = self._match(start)
                if match is not None:
                    stop, position = match
                    cut = position + len(stop) if self.params.include_stop_sequence else position
                    delta.texts.append(self._take(cut))
                    delta.stop_reason = StopReason.STOP_SEQUENCE
                    delta.stop_sequence = stop.decode()
                    self.finished = True
                    return delta
            delta.texts.append(self._release())
        if ending:
            # TGIS never shows a final EOS, even when special tokens are kept.
            if len(ids) and ids[-1] != self.params.eos_token_id:
                self._out += self._text.push(ids[-1]).encode()
            self._out += self._text.flush().encode()
            rest = self._take(len(self._out))
            if len(ids) or rest:  # an item without ids (e.g. a time-out in the queue) only flushes
                delta.texts.append(rest)
            self.finished = True
        return delta

    def _match(self, first_new: int) -> tuple[bytes, int] | None:
        """The first stop sequence (list order) ending in the new bytes, and where its last occurrence starts."""
        for stop in self._stops:
            position = self._out.rfind(stop, max(0, first_new - len(stop) + 1))
            if position >= 0:
                return stop, position
        return None

    def _release(self) -> str:
        if not self.params.stream:
            return ""
        limit = len(self._out) - self._stop_hold
        end = self._released
        clusters = _GRAPHEME.findall(self._out[self._released :].decode())
        for cluster in clusters[:-1]:
            size = len(cluster.encode())
            if end + size > limit:
                break
            end += size
        return self._take(end)

    def _take(self, end: int) -> str:
        text = self._out[self._released : end].decode()
        self._released = end
        return text
