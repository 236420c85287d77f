"""The TGIS conformance suite (`test_conformance.py`) on every other family: each `tgis_native` family (demo
tokenizer, random weights, positions for the suite's 200-token limit), Mistral with a sliding window shorter
than the suite's texts, OPT and BART served by hf_transformers; the reference is transformers.

Llama runs the suite in `test_conformance.py`; Qwen2 and window-less Mistral are Llama's code with other config
names (`models/llama.py`, checked against transformers in `test_model_families.py`). Every case applies to
encoder-decoders (T5, BART) with TGIS's seq2seq rules in the reference (`tgis_reference.py`: decoder start
token, penalties over decoder ids, NaN input details) and the echo's "\n\n". One server per family serves the
module's cases (module-scoped fixtures, grouped by family).
"""

from __future__ import annotations

import json

import pytest

from tests.families import build_with_tokenizer
from tests.test_conformance import *  # noqa: F403 (the suite's tests and fixtures run again on these models)

# model variant -> (engine the worker should choose, config overrides for 200-token sequences)
FAMILIES = {
    "gpt_neox": ("tgis_native", {"max_position_embeddings": 256}),
    "gpt_bigcode": ("tgis_native", {"n_positions": 256}),
    "falcon-new-arch": ("tgis_native", {"max_position_embeddings": 256}),
    "bloom": ("tgis_native", {}),
    "mpt": ("tgis_native", {"max_seq_len": 256}),
    "mistral-window": ("tgis_native", {"max_position_embeddings": 256, "sliding_window": 16}),
    "opt": ("hf_transformers", {"max_position_embeddings": 256}),
    "t5": ("tgis_native", {}),
    "bart": ("hf_transformers", {}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny_model_path(family, demo_model_path, tmp_path_factory):
    return build_with_tokenizer(family, tmp_path_factory.mktemp(f"conformance-{family}") / "model",
                                demo_model_path, seed=1, **FAMILIES[family][1])


def test_engine_is_chosen_by_model_type(server, tiny_model_path, family):
    model_type = json.loads((tiny_model_path / "config.json").read_text())["model_type"]
    assert f"Engine {FAMILIES[family][0]} for {model_type}" in server.logs()
