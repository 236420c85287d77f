"""The TGIS conformance suite (`test_conformance.py`) on other model families: MPT on tgis_native (ALiBi, no biases)
and OPT on hf_transformers, each with the demo tokenizer and 256 positions; the reference is transformers."""

from __future__ import annotations

import json

import pytest

from tests.families import build_with_tokenizer
from tests.test_conformance import *  # noqa: F403 (the suite's tests and fixtures run again on these models)

FAMILIES = {"mpt": {"max_seq_len": 256}, "opt": {"max_position_embeddings": 256}}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_model_path(request, demo_model_path, tmp_path_factory):
    return build_with_tokenizer(request.param, tmp_path_factory.mktemp(f"conformance-{request.param}") / "model",
                                demo_model_path, seed=1, **FAMILIES[request.param])


def test_engine_is_chosen_by_model_type(server, tiny_model_path):
    model_type = json.loads((tiny_model_path / "config.json").read_text())["model_type"]
    engine = "tgis_native" if model_type == "mpt" else "hf_transformers"
    assert f"Engine {engine} for {model_type}" in server.logs()
