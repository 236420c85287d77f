"""A sequence's state on the worker and the validated chunks of a step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.common.prompt_prefixes import Prefix
from services.common.protocol import LogitsParams, ScheduledChunk
from services.worker.guided import Guide
from services.worker.lora import LoraWeights


class StepError(ValueError):
    """One sequence of a step cannot run; it fails alone."""


@dataclass
class Sequence:
    """A sequence's state on the worker: its tokens (prompt then generated), how many are in its KV blocks."""

    request_id: str
    params: LogitsParams
    generator: torch.Generator | None
    tokens: list[int]
    prompt_length: int
    computed: int = 0
    generated: int = 0
    seen: torch.Tensor | None = None  # [vocab] ids in prompt and output, kept only for the repetition penalty
    details_sent: bool = field(default=False)
    prefix: Prefix | None = None  # prompt prefix, its embeddings replacing those of the first prompt positions
    cross: list | None = None  # encoder-decoder models: the encoder output's cross-attention K/V (seq2seq.py)
    guide: Guide | None = None  # guided decoding: the constraint's matcher, advanced with each token (guided.py)
    lora: LoraWeights | None = None  # its LoRA adapter (held here, so evicting it from the cache cannot drop it)


@dataclass
class Planned:
    """A validated chunk of this step."""

    sequence: Sequence
    chunk: ScheduledChunk

    @property
    def samples(self) -> bool:
        return self.chunk.start + self.chunk.count == len(self.sequence.tokens)

    @property
    def wants_input_details(self) -> bool:
        return self.samples and self.sequence.params.input_details and not self.sequence.details_sent
