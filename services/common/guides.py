"""Guided decoding constraints as xgrammar grammars: one definition for the gateway's check and the workers' compile."""

from __future__ import annotations

from services.common.protocol import GuideKind

# What `format: JSON` allows: any JSON object (the adapter's `json_object`).
ANY_JSON_OBJECT = '{"type": "object"}'


def parse_guide(xgrammar, kind: GuideKind, text: str):
    """The constraint as an xgrammar `Grammar`; raises the library's error when the text is not valid.

    JSON is generated without free whitespace between tokens: a small model given
    the choice tends to pad with newlines until it runs out of tokens.
    """
    if kind == GuideKind.JSON:
        return xgrammar.Grammar.from_json_schema(ANY_JSON_OBJECT, any_whitespace=False)
    if kind == GuideKind.JSON_SCHEMA:
        return xgrammar.Grammar.from_json_schema(text, any_whitespace=False)
    if kind == GuideKind.REGEX:
        return xgrammar.Grammar.from_regex(text)
    if kind == GuideKind.GRAMMAR:
        return xgrammar.Grammar.from_ebnf(text)
    raise ValueError(f"no constraint of kind {kind}")
