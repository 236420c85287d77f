"""Guided decoding at the gateway: the vLLM TGIS adapter's `guided` oneof as a constraint, checked before queueing.

The constraint travels to the workers as text (`LogitsParams.guide_kind`,
`.guide`), where xgrammar compiles it against the tokenizer
(`services/worker/guided.py`).  Here it is only parsed, with the same library
and options but no tokenizer, so a bad schema, regex or grammar is refused
with the library's own message before anything is queued.
"""

from __future__ import annotations

import functools
import json
import re

from services.common.guides import parse_guide
from services.common.protocol import GuideKind
from services.gateway.pb import generation_pb2 as pb

# xgrammar prefixes its errors with a time stamp and its C++ source location: not for clients.
_SOURCE_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
CHECK_CACHE_SIZE = 256  # distinct constraint texts whose check result is remembered


def guide_of(decoding: pb.DecodingParameters) -> tuple[GuideKind, str]:
    """The request's constraint as (kind, text); choices become a grammar of their literal alternatives."""
    which = decoding.WhichOneof("guided")
    if which is None or (which == "format" and decoding.format == pb.DecodingParameters.TEXT):
        return GuideKind.NONE, ""
    if which == "format":
        return GuideKind.JSON, ""
    if which == "json_schema":
        return GuideKind.JSON_SCHEMA, decoding.json_schema
    if which == "regex":
        return GuideKind.REGEX, decoding.regex
    if which == "grammar":
        return GuideKind.GRAMMAR, decoding.grammar
    return GuideKind.GRAMMAR, choices_grammar(list(decoding.choice.choices))


def choices_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly `choices` (JSON string escapes are xgrammar's literal escapes)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def check_guide(kind: GuideKind, text: str) -> str | None:
    """The library's message when the constraint cannot be compiled, else None (cached by text; may take ms)."""
    if kind == GuideKind.NONE:
        return None
    return _check(kind, text)


@functools.lru_cache(maxsize=CHECK_CACHE_SIZE)
def _check(kind: GuideKind, text: str) -> str | None:
    import xgrammar  # imported on first use: it takes seconds, and only guided requests need it

    try:
        parse_guide(xgrammar, kind, text)
    except (RuntimeError, ValueError, TypeError) as exc:
        message = _SOURCE_LOCATION.sub("", str(exc).strip())
        return f"invalid guided decoding {_FIELD[kind]}: {message}"
    return None


_FIELD = {GuideKind.JSON: "format", GuideKind.JSON_SCHEMA: "json_schema", GuideKind.REGEX: "regex",
          GuideKind.GRAMMAR: "grammar"}
