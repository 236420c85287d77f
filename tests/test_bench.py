"""Smoke test of `tgis-bench`: one tiny launched run produces figures for every level and the baseline."""

from __future__ import annotations

import json

import pytest

from bench.loadgen import main


@pytest.mark.e2e
def test_bench_launch_smoke(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out.json"
    code = main(["--launch", "--model", str(tiny_model_path), "--concurrency", "1,2", "--requests-per-level", "2",
                 "--input-tokens", "8", "--output-tokens", "4", "--json", str(out),
                 "--launcher-log", str(tmp_path / "launcher.log")])
    assert code == 0, (tmp_path / "launcher.log").read_text(errors="replace")
    results = json.loads(out.read_text())
    levels = results["levels"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    for level in levels:
        assert level["errors"]["count"] == 0, level["errors"]
        assert level["completed"] == 2
        assert level["tokens_per_s"] > 0
        assert level["ttft_s"]["p50"] is not None
        assert level["baseline"]["tokens_per_s"] > 0
        assert level["baseline"]["ratio"] > 0
    assert "ours/base" in capsys.readouterr().out
