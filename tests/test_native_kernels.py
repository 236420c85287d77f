"""Native CPU kernels: built once into the cache, reused, and left off (torch ops) where no compiler works."""

from __future__ import annotations

import logging

import pytest

from services.worker import cpu_attention, native


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TGIS_KERNEL_CACHE", str(tmp_path))
    native.load.cache_clear()
    yield tmp_path
    native.load.cache_clear()
    cpu_attention.enable(False)


def test_built_once_then_reused(fresh_cache, caplog):
    caplog.set_level(logging.INFO, logger="services.worker.native")
    assert native.load("paged_decode") is not None
    [library] = fresh_cache.glob("paged_decode-*.so")
    assert "Building native CPU kernel" in caplog.text
    native.load.cache_clear()  # a new worker process on the same machine
    caplog.clear()
    built = library.stat().st_mtime_ns
    assert native.load("paged_decode") is not None
    assert "Building" not in caplog.text and list(fresh_cache.glob("*.so")) == [library]
    assert library.stat().st_mtime_ns == built


def test_without_a_working_compiler_attention_keeps_torch_ops(fresh_cache, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert cpu_attention.enable(True) is False
    assert "attention runs on torch ops" in caplog.text
    assert not list(fresh_cache.glob("*.so"))
