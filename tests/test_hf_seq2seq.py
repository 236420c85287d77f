"""The hf_transformers engine's encoder-decoders against transformers: BART (no tgis_native implementation) runs
`test_t5.py`'s engine tests (greedy singly, batched, chunked and preempted; repetition penalty over decoder ids;
NaN input details; encoder and decoder prompt prefixes), and BART and T5 decoder logits equal transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker.checkpoint import load_model
from services.worker.models.hf_seq2seq import HFSeq2SeqLM
from tests.families import SEQ2SEQ_VARIANTS
from tests.test_t5 import (  # noqa: F401 (the engine tests run again here, on the `flan_path` fixture below)
    CPU,
    EOS,
    VOCAB,
    _decoder_logits,
    _engine,
    _inputs,
    _reference,
    build_t5,
    test_encoder_and_decoder_prompt_prefixes_equal_transformers,
    test_greedy_equals_generate_singly_batched_chunked_and_preempted,
    test_input_details_are_encoder_ids_with_nan_logprobs,
    test_repetition_penalty_sees_decoder_ids_only,
)


def build_bart(target: Path, seed: int = 0) -> Path:
    """A tiny random BART (the conformance suite's, on test_t5's vocabulary; 3 decoder layers, 2 encoder)."""
    from transformers import BartConfig, BartForConditionalGeneration

    settings = {**SEQ2SEQ_VARIANTS["bart"][1], "decoder_layers": 3}
    config = BartConfig(vocab_size=VOCAB, bos_token_id=0, eos_token_id=EOS, **settings)
    torch.manual_seed(seed)
    BartForConditionalGeneration(config).eval().save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def flan_path(tmp_path_factory) -> Path:
    """What test_t5's engine tests run on, here a BART (so served by hf_transformers)."""
    return build_bart(tmp_path_factory.mktemp("bart-engine"), seed=1)


def test_bart_loads_on_hf_transformers(flan_path, caplog):
    with caplog.at_level("INFO"):
        model = load_model(flan_path, torch.float32, CPU)
    assert isinstance(model, HFSeq2SeqLM) and model.encoder_decoder
    assert "Engine hf_transformers for bart: model type bart has no tgis_native implementation" in caplog.text
    assert model.args.decoder_start_token_id == 0 and model.args.num_layers == 3
    # Its own caches hold the K/V: the paged pool takes no memory, its whole budget bounds the blocks admitted.
    engine = _engine(flan_path)
    assert engine.cache.k[0].device.type == "meta" and engine.model_info().encoder_decoder


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_decoder_logits_equal_transformers(kind, tmp_path):
    """Chunked then decoded decoder rows (`test_t5._decoder_logits`) on hf_transformers, T5 too when asked for."""
    path = (build_bart if kind == "bart" else build_t5)(tmp_path / kind, seed=2)
    model, ref = load_model(path, torch.float32, CPU, framework="hf_transformers"), _reference(path)
    assert isinstance(model, HFSeq2SeqLM)
    encoder_ids, decoder_ids = _inputs()
    with torch.no_grad():
        expected = ref(input_ids=encoder_ids[None], decoder_input_ids=decoder_ids[None]).logits[0]
    torch.testing.assert_close(_decoder_logits(model, encoder_ids, decoder_ids), expected, atol=1e-4, rtol=0)
