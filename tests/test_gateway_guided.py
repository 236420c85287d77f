"""The gateway's reading of the `guided` oneof and its compile check (library messages, no source locations)."""

from __future__ import annotations

import pytest

from services.common.protocol import GuideKind
from services.gateway.guided import check_guide, choices_grammar, guide_of
from services.gateway.pb import generation_pb2 as pb
from services.gateway.validation import Limits, ValidationError, convert_and_validate

D = pb.DecodingParameters


def test_each_field_of_the_oneof_becomes_a_constraint():
    assert guide_of(D()) == (GuideKind.NONE, "")
    assert guide_of(D(format=D.TEXT)) == (GuideKind.NONE, "")
    assert guide_of(D(format=D.JSON)) == (GuideKind.JSON, "")
    assert guide_of(D(json_schema='{"type": "string"}')) == (GuideKind.JSON_SCHEMA, '{"type": "string"}')
    assert guide_of(D(regex="a+")) == (GuideKind.REGEX, "a+")
    assert guide_of(D(grammar='root ::= "a"')) == (GuideKind.GRAMMAR, 'root ::= "a"')
    assert guide_of(D(choice=D.StringChoices(choices=["a", 'b"c']))) == (GuideKind.GRAMMAR,
                                                                        'root ::= "a" | "b\\"c"')


def test_choices_with_quotes_backslashes_and_unicode_parse():
    assert check_guide(GuideKind.GRAMMAR, choices_grammar(['say "hi"', "back\\slash", "new\nline", "é😀", ""])) is None


@pytest.mark.parametrize(("kind", "text", "message"), [
    (GuideKind.JSON_SCHEMA, '{"type": 5}', "invalid guided decoding json_schema: Type should be a string"),
    (GuideKind.REGEX, "[a-", "invalid guided decoding regex: "),
    (GuideKind.GRAMMAR, "root ::= nothing", 'invalid guided decoding grammar: EBNF parser error at line 1, column 10: '
                                           'Rule "nothing" is not defined'),
])
def test_bad_constraints_get_the_librarys_message_without_its_source_location(kind, text, message):
    error = check_guide(kind, text)
    assert error.startswith(message) and ".cc:" not in error


def test_validation_carries_the_constraint_and_refuses_empty_choices():
    limits = Limits(200, 100)
    logits = convert_and_validate(pb.Parameters(decoding=D(regex="[0-9]+")), limits).logits
    assert (logits.guide_kind, logits.guide) == (GuideKind.REGEX, "[0-9]+")
    with pytest.raises(ValidationError, match="guided decoding choice must list at least one string"):
        convert_and_validate(pb.Parameters(decoding=D(choice=D.StringChoices())), limits)
