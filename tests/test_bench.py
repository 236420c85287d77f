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


def test_request_timing_ttft_and_inter_token_latency():
    from bench.stats import RequestTiming, summarize_level

    # The first message only carries the input token count; the last one brings two tokens at once.
    timing = RequestTiming(sent=10.0, arrivals=[(10.1, 0), (10.5, 1), (10.7, 2), (11.1, 4)], generated_tokens=4)
    assert timing.ttft() == pytest.approx(0.5)
    assert timing.inter_token_latencies() == pytest.approx([0.2, 0.2, 0.2])
    failed = RequestTiming(sent=10.0, finished=10.2, error_code="UNAVAILABLE", error_details="gone")
    level = summarize_level(2, [timing, failed], started=10.0, ended=12.0)
    assert level["completed"] == 1 and level["tokens_per_s"] == pytest.approx(2.0)
    assert level["errors"] == {"count": 1, "first": {"code": "UNAVAILABLE", "details": "gone"}}
    assert level["ttft_s"]["p50"] == pytest.approx(0.5)
