"""Guided decoding in the worker: an xgrammar matcher beside each constrained sequence, masks applied per step.

The matcher lives with the sequence's other sampling state (its tokens, RNG,
repetition-penalty ids), so it advances with each token the engine appends and
survives preemption (the worker keeps the sequence; recomputing its KV blocks
samples nothing twice).  Each distinct constraint text is compiled once against
the model's tokenizer in a background thread, started when the sequence is
added so it overlaps that step's forward pass, and cached by (kind, text).  Per
step only the constrained rows are touched: their matchers fill one bitmask
and xgrammar's kernel sets the disallowed logits to -inf in place before
TGIS's processors and warpers run, so unconstrained rows pay nothing and
logprobs are those of the constrained distribution.  EOS is a token of the
grammar: allowed only where the constraint may end, and the only one allowed
once it has ended.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from services.common.guides import parse_guide
from services.common.protocol import GuideKind, LogitsParams

logger = logging.getLogger(__name__)


class GuideError(ValueError):
    """The constraint could not be compiled for this model's tokenizer; its request fails alone."""


class Guide:
    """One sequence's constraint: its compiled grammar (possibly still compiling) and matcher state."""

    def __init__(self, compiled: Future, eos_id: int) -> None:
        self._compiled = compiled
        self._matcher = None
        self._eos_id = eos_id
        self.ended = False  # EOS accepted, or a token the grammar refused (then only EOS may follow)

    def matcher(self):
        """The matcher, once compilation finished (waits for it); raises GuideError if it failed."""
        if self._matcher is None:
            import xgrammar

            try:
                self._matcher = xgrammar.GrammarMatcher(self._compiled.result())
            except (RuntimeError, ValueError, TypeError) as exc:
                raise GuideError(f"guided decoding constraint failed to compile: {exc}") from exc
        return self._matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this sequence's allowed next tokens into `bitmask[row]`."""
        if self.ended:
            bitmask[row] = 0
            word, bit = divmod(self._eos_id, 32)
            bitmask[row, word] = (1 << bit) - (1 << 32 if bit == 31 else 0)  # int32 bit pattern
        else:
            self.matcher().fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        """Advance the matcher over the token the engine appended."""
        if self.ended:
            return
        matcher = self.matcher()
        if not matcher.accept_token(token):
            # Not expected (the token was chosen from the masked scores, and a forced EOS comes only where the
            # constraint allows nothing else); if it happens, the output ends here rather than leave the constraint.
            logger.warning("guided decoding: token %d is outside the constraint; only EOS follows", token)
            self.ended = True
        elif matcher.is_terminated():
            self.ended = True


class Guides:
    """Compiles constraints for one model's tokenizer (lazily: xgrammar and its vocabulary take seconds to load)."""

    def __init__(self, model_path: Path, vocab_size: int, eos_id: int, cache_size: int = 256) -> None:
        self.model_path = model_path
        self.cache_size = cache_size  # distinct constraints kept compiled (GUIDED_DECODING_CACHE_SIZE)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="guide-compile")
        self._compiler = None
        self._compiled: OrderedDict[tuple[GuideKind, str], Future] = OrderedDict()
        self._bitmask: torch.Tensor | None = None

    def start(self, params: LogitsParams) -> Guide | None:
        """A new sequence's guide, its compilation started (or found in the cache); None when unconstrained."""
        if params.guide_kind == GuideKind.NONE:
            return None
        key = (params.guide_kind, params.guide)
        future = self._compiled.get(key)
        if future is None or (future.done() and future.exception() is not None):  # a failed compile is retried
            future = self._pool.submit(self._compile, *key)
            self._compiled[key] = future
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return Guide(future, self.eos_id)

    def _compile(self, kind: GuideKind, text: str):
        import xgrammar

        if self._compiler is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=[self.eos_id])
            self._compiler = xgrammar.GrammarCompiler(info)
        return self._compiler.compile_grammar(parse_guide(xgrammar, kind, text))

    def mask(self, scores: torch.Tensor, rows: list[int], guides: list[Guide]) -> None:
        """Set the logits each constrained row's grammar forbids to -inf, in place (`rows` index `scores`)."""
        import xgrammar

        words = (self.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < scores.shape[0]:
            self._bitmask = torch.empty(max(scores.shape[0], 8), words, dtype=torch.int32)
        bitmask = self._bitmask[: scores.shape[0]]
        for row, guide in zip(rows, guides, strict=True):
            guide.fill(bitmask, row)
        xgrammar.apply_token_bitmask_inplace(scores, bitmask.to(scores.device, non_blocking=True),
                                             vocab_size=self.vocab_size, indices=rows)


def allow_eos_where_stuck(scores: torch.Tensor, rows: list[int], eos_id: int) -> None:
    """A constrained row with no token left (the constraint only allows EOS, min_new_tokens forbids it) gets EOS.

    The output is complete, so the row emits EOS (text-free) until min_new_tokens
    is reached and the scheduler stops it: min_new_tokens holds and the text
    stays inside the constraint.
    """
    index = torch.tensor(rows, device=scores.device)
    stuck = torch.isneginf(scores.index_select(0, index)).all(dim=-1)
    if bool(stuck.any()):
        scores[index[stuck], eos_id] = 0.0


def mask_guided(guides: Guides, sequences: list, scores: torch.Tensor, failures: dict[str, str]) -> list[int]:
    """Mask the rows of `scores` whose sequences are constrained; returns those rows.

    A sequence whose constraint failed to compile is put in `failures` (and gets
    no row): its request fails alone.
    """
    rows, row_guides = [], []
    for row, sequence in enumerate(sequences):
        if sequence.guide is None:
            continue
        try:
            if not sequence.guide.ended:
                sequence.guide.matcher()  # waits for its compilation, started when the sequence was added
        except GuideError as exc:
            failures[sequence.request_id] = str(exc)
            continue
        rows.append(row)
        row_guides.append(sequence.guide)
    if rows:
        guides.mask(scores, rows, row_guides)
    return rows
