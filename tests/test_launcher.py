"""The launcher: TGIS's start-up rules, supervision (a dead child stops all) and clean stops."""

from __future__ import annotations

import os
import signal
import time

import pytest

from services.launcher import Launcher, LauncherConfig, check_config, resolve_num_shard
from tests.pipeline import Pipeline


def test_num_shard_rules():
    assert resolve_num_shard(LauncherConfig(), {}) == 1
    assert resolve_num_shard(LauncherConfig(), {"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert resolve_num_shard(LauncherConfig(num_shard=2), {"NUM_GPUS": "2"}) == 2
    with pytest.raises(SystemExit, match=r"NUM_GPUS and num_shard are set to different values \(4 and 2\)"):
        resolve_num_shard(LauncherConfig(num_shard=2), {"NUM_GPUS": "4"})
    with pytest.raises(SystemExit, match="NUM_GPUS must be a positive integer"):
        resolve_num_shard(LauncherConfig(), {"NUM_GPUS": "many"})


def test_contradictory_settings_are_refused():
    with pytest.raises(SystemExit, match="dtype and dtype_str args both provided with different values"):
        check_config(LauncherConfig(dtype="float16", dtype_str="float32"))
    with pytest.raises(SystemExit, match="cuda_process_memory_fraction must be in range 0 < x <= 1"):
        check_config(LauncherConfig(cuda_process_memory_fraction=1.5))
    with pytest.raises(SystemExit, match="^gptq quantization not supported by tgis-pipeline"):
        check_config(LauncherConfig(quantize="gptq"))


def test_unused_tgis_flags_are_accepted_with_a_warning(caplog):
    check_config(LauncherConfig(quantize="int4", max_prefill_padding=0.5))
    assert "--max-prefill-padding is set to 0.5 but this pipeline does not use it yet" in caplog.text
    assert "--quantize" not in caplog.text


@pytest.mark.parametrize(("settings", "dtype"), [({"quantize": "int4"}, "bfloat16"), ({}, None),
                                                 ({"quantize": "int8", "dtype_str": "float32"}, "float32"),
                                                 ({"quantize": "none"}, None)])
def test_quantized_workers_default_to_bfloat16(tmp_path, settings, dtype):
    env = Launcher(LauncherConfig(ipc_dir=str(tmp_path), **settings), {}).env
    assert env.get("DTYPE_STR") == dtype
    assert env.get("QUANTIZE") == settings.get("quantize")


@pytest.mark.e2e
def test_sigint_stops_everything_with_exit_zero(tiny_model_path, tmp_path):
    pipeline = Pipeline(tiny_model_path, tmp_path).start()
    children = pipeline.child_pids("services.")
    assert len(children) == 5  # scheduler, worker, 2 tokenizers, gateway
    started = time.monotonic()
    pipeline.process.send_signal(signal.SIGINT)
    assert pipeline.process.wait(15) == 0
    assert time.monotonic() - started < 10
    pipeline.stop()
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.e2e
def test_dead_worker_stops_the_pipeline_and_is_named(tiny_model_path, tmp_path):
    pipeline = Pipeline(tiny_model_path, tmp_path).start()
    (worker,) = pipeline.child_pids("services.worker.main")
    os.kill(worker, signal.SIGKILL)
    assert pipeline.process.wait(30) == 1
    pipeline.stop()
    assert "worker-0 exited unexpectedly with code -9; stopping the pipeline" in pipeline.logs()


@pytest.mark.e2e
def test_missing_model_fails_clearly(tmp_path):
    pipeline = Pipeline(tmp_path / "no-such-model", tmp_path)
    with pytest.raises(RuntimeError, match="Model .*no-such-model not found"):
        pipeline.start(timeout=60)
