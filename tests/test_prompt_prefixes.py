"""The prompt prefix store and the gateway's lookup: every TGIS rule and message, the LRU cache, the limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.common.prompt_prefixes import (
    CACHE_ROUNDING,
    PrefixError,
    PrefixModel,
    PrefixNotFound,
    PrefixStore,
    max_prefix_length,
)
from services.common.protocol import token_ids
from services.gateway.metrics import GatewayMetrics
from services.gateway.pb import generation_pb2 as pb
from services.gateway.prefixes import PrefixLookup
from services.gateway.validation import (
    Limits,
    ValidatedInput,
    ValidationError,
    check_input,
    convert_and_validate,
    with_prefix_placeholders,
)

HIDDEN = 8
MODEL = PrefixModel(hidden_size=HIDDEN, dtype="float16", encoder_decoder=False, max_length=6)


def _save(store: Path, prefix_id: str, tensor: object, name: str = "decoder.pt") -> None:
    folder = store / prefix_id
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tensor, folder / name)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "prefixes"
    _save(path, "good", torch.randn(4, HIDDEN))
    _save(path, "nested/deep", torch.randn(2, HIDDEN))
    _save(path, "one-d", torch.randn(HIDDEN))
    _save(path, "empty", torch.zeros(0, HIDDEN))
    _save(path, "long", torch.randn(7, HIDDEN))
    _save(path, "narrow", torch.randn(3, HIDDEN - 1))
    _save(path, "nan", torch.full((2, HIDDEN), float("nan")))
    _save(path, "huge", torch.full((2, HIDDEN), 1e6))  # finite in float32, inf in float16
    _save(path, "not-a-tensor", {"x": 1})
    (path / "no-files").mkdir()
    return path


@pytest.mark.parametrize(("prefix_id", "message"), [
    ("bad id!", "Invalid prefix id bad id!, must contain only alphanumeric, _ and - and /"),
    ("../prefixes-elsewhere", "Invalid prefix id ../prefixes-elsewhere, must contain only alphanumeric, _ and - and /"),
    ("nested/../../x", "Invalid prefix id nested/../../x, must contain only alphanumeric, _ and - and /"),
    ("one-d", "Invalid prefix embedding tensor"),
    ("not-a-tensor", "Invalid prefix embedding tensor"),
    ("empty", "Invalid prefix embedding length of 0"),
    ("long", "Invalid prefix embedding length of 7"),
    ("narrow", f"Prefix embedding tensor dim {HIDDEN - 1} does not match model ({HIDDEN})"),
    ("nan", "Prefix contains non-finite elements"),
    ("huge", "Prefix contains non-finite elements after conversion from torch.float32 to torch.float16"),
])
def test_bad_prefixes_give_tgis_messages(store_path, prefix_id, message):
    with pytest.raises(PrefixError) as error:
        PrefixStore(store_path, MODEL, 2**20).get(prefix_id)
    assert str(error.value) == message


def test_a_path_leaving_the_store_is_refused(store_path):
    # Only "/", "\\w" and "-" pass the pattern, so leaving the store needs a symbolic link.
    _save(store_path.parent, "outside", torch.randn(2, HIDDEN))
    (store_path / "out").symlink_to(store_path.parent / "outside")
    with pytest.raises(PrefixError) as error:
        PrefixStore(store_path, MODEL, 2**20).get("out")
    assert str(error.value) == "Invalid prefix id out"


@pytest.mark.parametrize("prefix_id", ["missing", "no-files", "nested"])
def test_missing_prefixes_are_not_found(store_path, prefix_id):
    with pytest.raises(PrefixNotFound, match=f"^Prefix id {prefix_id} not found$"):
        PrefixStore(store_path, MODEL, 2**20).get(prefix_id)


def test_good_prefixes_load_in_the_model_dtype(store_path):
    store = PrefixStore(store_path, MODEL, 2**20)
    good, nested = store.get("good"), store.get("nested/deep")
    assert (good.length, nested.length) == (4, 2)
    assert good.decoder.dtype == torch.float16 and good.encoder is None
    assert torch.equal(good.decoder, torch.load(store_path / "good" / "decoder.pt").half())


def test_lru_cache_by_rounded_size_evicts_and_reloads(store_path):
    size = CACHE_ROUNDING  # 4 x 8 float16 = 64 bytes and 2 x 8 = 32 bytes both round up to 512
    store = PrefixStore(store_path, MODEL, 2 * size)
    first = store.get("good")
    store.get("nested/deep")
    assert store.get("good") is first  # a hit, and now the most recent
    _save(store_path, "third", torch.randn(1, HIDDEN))
    store.get("third")  # evicts nested/deep, the least recently used
    assert store.cached("good") and store.cached("third") and not store.cached("nested/deep")
    assert store.get("nested/deep").length == 2  # reloaded
    assert not store.cached("good")


def test_a_prefix_larger_than_the_cache_is_refused(store_path):
    with pytest.raises(PrefixError, match="^Prefix ID object good exceeds the allowed cache size$"):
        PrefixStore(store_path, MODEL, CACHE_ROUNDING - 1).get("good")


def test_peft_adapters_load_prompt_embeddings(tmp_path):
    embeddings = torch.randn(3, HIDDEN)
    (tmp_path / "st").mkdir()
    save_file({"prompt_embeddings": embeddings}, str(tmp_path / "st" / "adapter_model.safetensors"))
    (tmp_path / "bin").mkdir()
    torch.save({"prompt_embeddings": embeddings}, tmp_path / "bin" / "adapter_model.bin")
    store = PrefixStore(tmp_path, MODEL, 2**20)
    for prefix_id in ("st", "bin"):
        assert torch.equal(store.get(prefix_id).decoder, embeddings.half())
    seq2seq = PrefixStore(tmp_path, PrefixModel(HIDDEN, "float32", True, 6), 2**20)
    with pytest.raises(PrefixError, match="^encoder-decoder architectures not supported for peft models$"):
        seq2seq.get("st")


def test_encoder_decoder_prefixes_count_encoder_and_decoder_plus_start(tmp_path):
    _save(tmp_path, "both", torch.randn(2, HIDDEN))
    _save(tmp_path, "both", torch.randn(4, HIDDEN), "encoder.pt")
    _save(tmp_path, "enc", torch.randn(4, HIDDEN), "encoder.pt")
    _save(tmp_path, "odd", torch.randn(3, HIDDEN), "encoder.pt")
    store = PrefixStore(tmp_path, PrefixModel(HIDDEN, "float32", True, 6), 2**20)
    assert (store.get("both").length, store.get("enc").length) == (2 + 1 + 4, 4)
    with pytest.raises(PrefixError, match="Invalid prefix embedding length of 3"):
        store.get("odd")
    with pytest.raises(PrefixNotFound):  # a decoder-only model needs decoder.pt
        PrefixStore(tmp_path, MODEL, 2**20).get("enc")


def test_max_prefix_length_defaults_to_half_the_context():
    assert max_prefix_length(None, 201) == 101
    assert max_prefix_length(10, 11) == 10
    with pytest.raises(ValueError, match="MAX_PROMPT_PREFIX_LENGTH"):
        max_prefix_length(11, 11)


def _lookup(store: PrefixStore | None) -> tuple[PrefixLookup, GatewayMetrics]:
    metrics = GatewayMetrics(64, 32, 4)
    return PrefixLookup(metrics, store), metrics


def test_gateway_lookup_messages_and_metrics(store_path):
    lookup, metrics = _lookup(PrefixStore(store_path, MODEL, 2**20))
    assert asyncio.run(lookup.length("good")) == 4
    with pytest.raises(ValidationError) as error:
        asyncio.run(lookup.length("missing"))
    assert str(error.value) == "can't retrieve prompt prefix with id 'missing': prefix id \"missing\" not found"
    with pytest.raises(ValidationError) as error:
        asyncio.run(lookup.length("long"))
    assert str(error.value) == "can't retrieve prompt prefix with id 'long': Invalid prefix embedding length of 7"
    assert metrics.prompt_load_failure._value.get() == 2
    assert metrics.prompt_load_duration._sum.get() > 0
    disabled, _ = _lookup(None)
    with pytest.raises(ValidationError, match="prefix id \"good\" not found"):
        asyncio.run(disabled.length("good"))


def test_prefix_length_counts_in_the_limits_but_not_in_the_input_length():
    limits = Limits(max_sequence_length=10, max_new_tokens=9)
    params = convert_and_validate(pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=5)), limits)
    checked = check_input(token_ids([7, 8, 9]), params, limits, prefix_length=4)
    assert (checked.input_length, checked.prefix_length, checked.stop.max_new_tokens) == (3, 4, 3)
    assert checked.stop.token_limited
    assert list(with_prefix_placeholders(checked, pad_token_id=0)) == [0, 0, 0, 0, 7, 8, 9]
    with pytest.raises(ValidationError, match=r"^input tokens \(3\) plus prefix length \(7\) must be < 10$"):
        check_input(token_ids([7, 8, 9]), params, limits, prefix_length=7)
    plain = ValidatedInput(token_ids([5]), 1, checked.stop, 0)
    assert list(with_prefix_placeholders(plain, pad_token_id=0)) == [5]
