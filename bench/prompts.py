"""Synthetic prompts of an exact length in tokens, counted by the server's own Tokenize RPC."""

from __future__ import annotations

import random
from dataclasses import dataclass

from services.gateway.pb import generation_pb2 as pb
from services.gateway.pb import generation_pb2_grpc

# Common English words; the ones that the served tokenizer encodes as one token after a space are kept, so a
# prompt's length is (nearly) its word count and only rarely needs adjusting.
WORDS = """
the of and to in is was for that with as on by at from his her their they this which but not are were
have has had one all can will would there what about when out up into more some could time two other than
then now only new also after first may any these over such very just where most make like long many before
year years day people world life work man men woman house water city state school group part place case
week company number system program question government point home room mother father night story fact
month lot right study book eye job word business issue side kind head far black white long little great
old young small large big high low good bad own same few public sure real best better free full
green blue red river mountain forest garden window table chair paper music light road stone field
market bridge winter summer morning evening island ocean valley village castle letter doctor teacher
student picture animal bird horse dog cat fish tree flower apple bread milk coffee sugar salt cloud rain
snow wind fire earth star moon sun ship train car plane bike street corner center north south east west
""".split()

MAX_ADJUST_ROUNDS = 8


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text and the tokens the server made of it (token strings, specials included)."""

    text: str
    tokens: tuple[str, ...]


class PromptFactory:
    """Builds prompts of exactly `target_tokens` tokens from shuffled word lists, varied per request."""

    def __init__(self, stub: generation_pb2_grpc.GenerationServiceStub, target_tokens: int, seed: int = 0) -> None:
        self.stub = stub
        self.target = target_tokens
        self.rng = random.Random(seed)
        self.words: list[str] = []
        self.overhead = 0

    async def calibrate(self) -> None:
        """Find the words that cost one token after a space, and the tokens the server adds to every text."""
        base = "the"
        texts = [base] + [f"{base} {word}" for word in WORDS]
        counts = [r.token_count for r in (await self._tokenize(texts)).responses]
        # A BOS token (if the tokenizer adds one) counts in every text; "the" itself is one more token.
        self.overhead = counts[0] - 1
        self.words = [word for word, count in zip(WORDS, counts[1:], strict=True) if count - counts[0] == 1]
        if len(self.words) < 16:
            self.words = list(WORDS)  # an unusual tokenizer: fall back on the adjustment loop

    async def build(self, count: int, tokens: int | None = None) -> list[Prompt]:
        """`count` prompts of exactly `tokens` (default `self.target`) tokens, each a different word order."""
        target = tokens or self.target
        if target < self.overhead + 1:
            raise ValueError(f"prompts must be at least {self.overhead + 1} tokens long for this tokenizer")
        drafts = [self._draft(target - self.overhead) for _ in range(count)]
        for _ in range(MAX_ADJUST_ROUNDS):
            responses = (await self._tokenize([" ".join(d) for d in drafts], return_tokens=True)).responses
            if all(r.token_count == target for r in responses):
                return [Prompt(" ".join(d), tuple(r.tokens)) for d, r in zip(drafts, responses, strict=True)]
            drafts = [self._adjust(d, r.token_count, target) for d, r in zip(drafts, responses, strict=True)]
        raise RuntimeError(f"could not build prompts of exactly {target} tokens")

    async def build_with_prefix(self, prefix: Prompt, count: int, suffix_words: int) -> list[Prompt]:
        """`count` prompts that all start with `prefix`'s text, each followed by its own random words."""
        texts = [f"{prefix.text} {' '.join(self._draft(suffix_words))}" for _ in range(count)]
        responses = (await self._tokenize(texts, return_tokens=True)).responses
        return [Prompt(text, tuple(r.tokens)) for text, r in zip(texts, responses, strict=True)]

    def _draft(self, n_words: int) -> list[str]:
        # Random order and choice per prompt: no two prompts share a prefix a cache could reuse.
        return [self.rng.choice(self.words) for _ in range(max(n_words, 1))]

    def _adjust(self, words: list[str], count: int, target: int) -> list[str]:
        """Drop words when too long, add some when too short (at least one word is kept)."""
        if count > target:
            return words[: max(1, len(words) - (count - target))]
        return words + self._draft(target - count) if count < target else words

    async def _tokenize(self, texts: list[str], return_tokens: bool = False) -> pb.BatchedTokenizeResponse:
        request = pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=t) for t in texts],
                                            return_tokens=return_tokens)
        return await self.stub.Tokenize(request)
