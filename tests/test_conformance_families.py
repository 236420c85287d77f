"""The TGIS conformance suite (`test_conformance.py`) on OPT served by hf_transformers (demo tokenizer, 256
positions; the reference is transformers).

Only one more model here, to keep CI time in check: the native families are checked against transformers
in `test_model_families.py`, and the suite passed on MPT, Falcon (new architecture), GPT-BigCode and BLOOM
(but for a stop-sequence test whose choice of text does not fit BLOOM's repetitive output) when run by hand
with this module's fixture pointed at them.
"""

from __future__ import annotations

import json

import pytest

from tests.families import build_with_tokenizer
from tests.test_conformance import *  # noqa: F403 (the suite's tests and fixtures run again on these models)

FAMILIES = {"opt": {"max_position_embeddings": 256}}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_model_path(request, demo_model_path, tmp_path_factory):
    return build_with_tokenizer(request.param, tmp_path_factory.mktemp(f"conformance-{request.param}") / "model",
                                demo_model_path, seed=1, **FAMILIES[request.param])


def test_engine_is_chosen_by_model_type(server, tiny_model_path):
    model_type = json.loads((tiny_model_path / "config.json").read_text())["model_type"]
    assert f"Engine hf_transformers for {model_type}" in server.logs()
