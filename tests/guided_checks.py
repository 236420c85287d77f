"""The five guided-decoding kinds for tests, each with an independent check (json, jsonschema, re, not xgrammar).

A finished output (EOS) must be in the constraint's language; a cut one
(MAX_TOKENS) must be a prefix of some string in it.
"""

from __future__ import annotations

import json
import re

import jsonschema
import regex

from services.gateway.pb import generation_pb2 as pb

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
PATTERN = r"[0-9]{3}-[a-z]{2,8}"
CHOICES = ["yes", "no", "maybe so"]
# A finite language, so even a random model ends it; the same language as GRAMMAR_AS_REGEX.
GRAMMAR = 'root ::= "(" num ("+" num)? ")"\nnum ::= [1-9] [0-9]?'
GRAMMAR_AS_REGEX = r"\([1-9][0-9]?(\+[1-9][0-9]?)?\)"

DECODING = {
    "json": pb.DecodingParameters(format=pb.DecodingParameters.JSON),
    "json_schema": pb.DecodingParameters(json_schema=json.dumps(SCHEMA)),
    "regex": pb.DecodingParameters(regex=PATTERN),
    "choice": pb.DecodingParameters(choice=pb.DecodingParameters.StringChoices(choices=CHOICES)),
    "grammar": pb.DecodingParameters(grammar=GRAMMAR),
}


def check(kind: str, text: str, finished: bool) -> None:
    """Assert `text` is in kind's language (finished) or a prefix of a string in it (cut short)."""
    if kind in ("json", "json_schema"):
        if finished:
            value = json.loads(text)
            assert isinstance(value, dict), text
            if kind == "json_schema":
                jsonschema.validate(value, SCHEMA)
        else:
            assert _json_prefix(text), text
    elif kind == "choice":
        assert (text in CHOICES) if finished else any(c.startswith(text) for c in CHOICES), text
    else:
        pattern = PATTERN if kind == "regex" else GRAMMAR_AS_REGEX
        if finished:
            assert re.fullmatch(pattern, text), text
        else:
            assert regex.fullmatch(pattern, text, partial=True), text


def _json_prefix(text: str) -> bool:
    """Whether `text` is the start of some JSON value: close what is open and parse it."""
    if not text.strip():
        return True
    closers, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            closers.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not closers or closers.pop() != ch:
                return False
    done = text
    if in_string:
        done = re.sub(r"\\u[0-9a-fA-F]{0,3}$", lambda m: m.group() + "0" * (6 - len(m.group())), done)
        done += ("n" if escaped else "") + '"'
    done = done.rstrip()
    if closers and closers[-1] == "}" and re.search(r'[{,]\s*"(?:[^"\\]|\\.)*"$', done):
        done += ":0"  # a key without its value
    partial_literal = re.search(r"(?<![\w\"])(t|tr|tru|f|fa|fal|fals|n|nu|nul)$", done)
    if partial_literal:
        done += {"t": "true", "f": "false", "n": "null"}[partial_literal.group()[0]][len(partial_literal.group()):]
    elif done.endswith(",") and not re.search(r"[{\[,]\s*,$", done):
        done = done[:-1]
    elif done.endswith(":") or re.search(r"[-+.eE]$", done):
        done += "0"
    try:
        json.loads(done + "".join(reversed(closers)))
    except json.JSONDecodeError:
        return False
    return True

