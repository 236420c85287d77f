"""Tokenize work: ids, tokens and offsets as the HF fast tokenizer gives them, with special tokens added."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from transformers import AutoTokenizer

from services.common.protocol import Tokenize
from services.tokenizer.encoding import (
    NO_FAST_TOKENIZER,
    TokenizerNotFoundError,
    is_encoder_decoder,
    load_tokenizer,
    tokenize,
)

pytestmark = pytest.mark.demo_model

TEXTS = [
    "Hello world!",
    "  leading spaces, café, 日本語 and 😀👍🏽",
    "<|im_start|>user\nA special token in the text<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def bos_model_path(demo_model_path, tmp_path_factory):
    """The demo tokenizer made to add a BOS token (<|im_start|>), like Llama tokenizers do."""
    folder = tmp_path_factory.mktemp("bos-tokenizer")
    spec = json.loads((demo_model_path / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(demo_model_path / "tokenizer_config.json", folder)
    return folder


@pytest.mark.parametrize("model", ["demo_model_path", "bos_model_path"])
def test_tokenize_matches_transformers(model, request):
    path = request.getfixturevalue(model)
    reference = AutoTokenizer.from_pretrained(path, local_files_only=True)
    result = tokenize(load_tokenizer(path), Tokenize(job_id=7, texts=TEXTS, return_tokens=True, return_offsets=True))
    assert result.job_id == 7 and not result.error and len(result.results) == len(TEXTS)
    for text, got in zip(TEXTS, result.results, strict=True):
        expected = reference(text, add_special_tokens=True, return_offsets_mapping=True)
        assert list(got.ids) == expected["input_ids"]
        assert got.tokens == reference.convert_ids_to_tokens(expected["input_ids"])
        assert [tuple(o) for o in got.offsets] == [tuple(o) for o in expected["offset_mapping"]]


def test_special_tokens_added_with_zero_offsets(bos_model_path):
    result = tokenize(
        load_tokenizer(bos_model_path), Tokenize(1, ["Hello world"], return_tokens=True, return_offsets=True)
    )
    encoded = result.results[0]
    assert encoded.tokens == ["<|im_start|>", "Hello", "Ġworld"]
    assert encoded.offsets == [(0, 0), (0, 5), (5, 11)]


def test_tokens_and_offsets_only_when_asked(demo_model_path):
    result = tokenize(load_tokenizer(demo_model_path), Tokenize(2, ["Hello world"]))
    assert list(result.results[0].ids) == [19556, 905]
    assert result.results[0].tokens == [] and result.results[0].offsets == []


def test_truncation_and_padding_are_off(demo_model_path, tmp_path):
    spec = json.loads((demo_model_path / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    result = tokenize(load_tokenizer(tmp_path), Tokenize(3, ["one two three four", "five"]))
    assert [len(r.ids) for r in result.results] == [4, 1]


def test_tokenizer_error_is_reported_not_raised(demo_model_path):
    result = tokenize(load_tokenizer(demo_model_path), Tokenize(4, [None]))  # type: ignore[list-item]
    assert result.job_id == 4 and result.results == [] and result.error


def test_fallback_builds_the_fast_tokenizer_with_transformers(demo_model_path, tmp_path):
    """No tokenizer.json: transformers converts the GPT-2 style vocab.json + merges.txt."""
    model = json.loads((demo_model_path / "tokenizer.json").read_text())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    expected = load_tokenizer(demo_model_path).encode("Hello world! café").ids
    assert load_tokenizer(tmp_path).encode("Hello world! café").ids == expected


def test_missing_tokenizer_and_model_kind(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "is_encoder_decoder": False}))
    with pytest.raises(TokenizerNotFoundError, match=re.escape(NO_FAST_TOKENIZER)):
        load_tokenizer(tmp_path)
    assert not is_encoder_decoder(tmp_path) and not is_encoder_decoder(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    assert is_encoder_decoder(tmp_path)
