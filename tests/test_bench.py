"""Smoke test of `tgis-bench`: every scenario, two launched servers and the baselines on tiny sizes; the figures' parts."""

from __future__ import annotations

import json

import pytest

from bench.loadgen import main
from bench.stats import RequestTiming, summarize_level


@pytest.mark.e2e
def test_bench_all_scenarios_several_servers_and_baselines(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out.json"
    code = main(["--launch", "--model", str(tiny_model_path), "--server", "a:--max-batch-size 4", "--server", "b:",
                 "--server", "broken:--no-such-flag",
                 "--concurrency", "1,2", "--requests-per-level", "2", "--input-tokens", "8", "--output-tokens", "4",
                 "--prefix-tokens", "32", "--prefix-requests", "2", "--long-tokens", "40", "--long-concurrency", "2",
                 "--interference-tokens", "48", "--interference-streams", "2", "--interference-stream-tokens", "24",
                 "--warmup-requests", "1", "--json", str(out), "--launcher-log", str(tmp_path / "launcher.log")])
    logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("launcher*.log"))
    assert code == 0, logs
    results = json.loads(out.read_text())
    expected_cases = {"short": ["conc 1", "conc 2"], "prefix": ["first", "repeat"], "long": ["conc 2"],
                      "interference": ["2 streams", "48-token prompt"]}
    *started, broken = results["servers"]
    assert [s["server"] for s in started] == ["a", "b"]
    # A configuration that cannot start is reported, and the others still ran.
    assert broken["server"] == "broken" and broken["scenarios"] == [] and "launcher exited" in broken["error"]
    # Server b's batch was sized by the bench for the largest scenario: 2 streams + the arriving prompt.
    assert results["servers"][1]["launcher_args"] == ["--max-batch-size", "3"]
    for server in started:
        assert {s["scenario"]: [r["case"] for r in s["rows"]] for s in server["scenarios"]} == expected_cases
        for scenario in server["scenarios"]:
            for row in scenario["rows"]:
                assert row["errors"]["count"] == 0, row["errors"]
                assert row["completed"] == row["requests"] > 0
                assert row["ttft_s"]["p50"] is not None
                assert set(row["vs"]) == {"transformers-fp32", "transformers-bf16"}
            assert scenario["step"]["steps"] > 0 and scenario["step"]["outside_forward_ms"] is not None
            assert scenario["worker_memory"]["rss_mib"] > 0
        by_name = {s["scenario"]: s for s in server["scenarios"]}
        assert by_name["prefix"]["figures"]["repeat_over_first_ttft"] > 0
        # The server exports prefix-cache token counters: the share is there (its value is not judged).
        assert 0 <= by_name["prefix"]["step"]["prefix_hit_share"] <= 1
        assert by_name["interference"]["figures"]["window_s"] > 0
    baselines = results["baselines"]
    for name in ("transformers-fp32", "transformers-bf16"):
        assert set(baselines[name]) == {"short/conc 1", "short/conc 2", "prefix/first", "prefix/repeat", "long/conc 2"}
        assert baselines[name]["short/conc 1"]["tokens_per_s"] > 0
        assert baselines[name]["prefix/repeat"]["ttft_s"] > 0
    # No GGUF for a random model: llama.cpp is skipped and says why (whether or not it is installed).
    assert "skipped" in baselines["llama.cpp"]
    printed = capsys.readouterr().out
    assert "vs transformers-bf16" in printed and "baseline llama.cpp skipped" in printed
    assert "outside fwd ms" in printed and "repeat / first TTFT" in printed and "broken did not start" in printed


def test_request_timing_ttft_and_inter_token_latency():
    # The first message only carries the input token count; the last one brings two tokens at once.
    timing = RequestTiming(sent=10.0, arrivals=[(10.1, 0), (10.5, 1), (10.7, 2), (11.1, 4)], generated_tokens=4)
    assert timing.ttft() == pytest.approx(0.5)
    assert timing.inter_token_latencies() == pytest.approx([0.2, 0.2, 0.2])
    failed = RequestTiming(sent=10.0, finished=10.2, error_code="UNAVAILABLE", error_details="gone")
    level = summarize_level(2, [timing, failed], started=10.0, ended=12.0)
    assert level["completed"] == 1 and level["tokens_per_s"] == pytest.approx(2.0)
    assert level["errors"] == {"count": 1, "first": {"code": "UNAVAILABLE", "details": "gone"}}
    assert level["ttft_s"]["p50"] == pytest.approx(0.5)


def test_inter_token_latency_in_a_window_keeps_the_gaps_that_overlap_it():
    timing = RequestTiming(sent=0.0, arrivals=[(1.0, 1), (1.1, 2), (2.0, 3), (2.1, 4)], generated_tokens=4)
    # The stall from 1.1 to 2.0 spans the window's end; the gaps before and after it do not overlap it.
    assert timing.inter_token_latencies(during=(1.2, 1.5)) == pytest.approx([0.9])
    assert timing.inter_token_latencies(during=(1.05, 2.05)) == pytest.approx([0.1, 0.9, 0.1])


def test_step_costs_from_metrics_text():
    from bench.server_stats import step_costs, step_totals

    text = "\n".join([
        "# TYPE tgi_batch_inference_duration histogram",
        'tgi_batch_inference_duration_sum{method="prefill",makeup="single_only"} 0.5',
        'tgi_batch_inference_duration_count{method="prefill",makeup="single_only"} 2',
        'tgi_batch_inference_duration_sum{method="next_token",makeup="single_only"} 1.5',
        'tgi_batch_inference_duration_count{method="next_token",makeup="single_only"} 18',
        "# TYPE tgi_batch_inference_forward_duration histogram",
        'tgi_batch_inference_forward_duration_sum{method="prefill",makeup="single_only"} 0.45',
        'tgi_batch_inference_forward_duration_sum{method="next_token",makeup="single_only"} 1.35',
        "# TYPE tgi_prefix_cache_hit_tokens counter",
        "tgi_prefix_cache_hit_tokens 300",
        "tgi_prefix_cache_hit_tokens_total 300",
        "# TYPE tgi_prefix_cache_queried_tokens counter",
        "tgi_prefix_cache_queried_tokens 400",
        "tgi_prefix_cache_queried_tokens_total 400",
    ])
    after = step_totals(text)
    assert after == {"steps": 20, "step_s": pytest.approx(2.0), "forward_s": pytest.approx(1.8), "prefix_hit": 300,
                     "prefix_queried": 400}
    costs = step_costs({"steps": 10, "step_s": 1.0, "forward_s": 0.9, "prefix_hit": 100, "prefix_queried": 200}, after)
    assert costs["steps"] == 10 and costs["prefix_hit_share"] == pytest.approx(1.0)
    assert costs["step_ms"] == pytest.approx(100.0) and costs["outside_forward_ms"] == pytest.approx(10.0)
    assert step_costs(after, after)["outside_forward_ms"] is None


@pytest.mark.demo_model
def test_llama_cpp_baseline_streams_the_asked_tokens_one_prompt_at_a_time(demo_model_path):
    pytest.importorskip("llama_cpp", reason="the optional bench extra (llama-cpp-python) is not installed")
    from transformers import AutoTokenizer

    from bench.compare import ratio
    from bench.llamacpp import PROMPTS_PER_CASE, LlamaCppBaseline, demo_gguf
    from bench.scenarios import Case

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    shared = tokenizer("The history of the city " * 40)["input_ids"]
    prompts = [shared + tokenizer(f" question {i}?")["input_ids"] for i in range(PROMPTS_PER_CASE + 1)]
    baseline = LlamaCppBaseline(demo_gguf(), threads=2, context=512)
    figures = baseline.run(Case("short", "conc 8", (), 8, 3, "throughput"), prompts)
    # One stream at a time, on at most PROMPTS_PER_CASE prompts, exactly the asked tokens each.
    assert figures["prompts"] == PROMPTS_PER_CASE and figures["generated_tokens"] == 3 * PROMPTS_PER_CASE
    assert figures["tokens_per_s"] > 0 and figures["itl_s"] > 0
    first = baseline.run(Case("prefix", "first", (), 1, 1, "ttft"), prompts[:1])
    repeats = baseline.run(Case("prefix", "repeat", (), 1, 1, "ttft"), prompts[1:])
    assert repeats["prompts"] == PROMPTS_PER_CASE and first["ttft_s"] > 0 and repeats["ttft_s"] > 0
    row = {"completed": 1, "ttft_s": {"p50": first["ttft_s"] / 2}, "tokens_per_s": None}
    assert ratio(row, {"measure": "ttft", **first}) == pytest.approx(2.0)
