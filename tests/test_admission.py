"""Admission by memory: TGIS flash weight model (spec §4.4) and try_next_batch (§4.2) against hand-computed cases."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from services.common.config import config_from_namespace
from services.launcher import Launcher, LauncherConfig, check_config
from services.scheduler.admission import MemoryModel, try_next_batch
from services.scheduler.config import SchedulerConfig


@dataclass
class Seq:
    input_length: int
    max_new_tokens: int
    queued_at: float = 0.0
    generated: int = 0


def names(entries, picked):
    return [entries.index(p) for p in picked]


# --- the weight model -------------------------------------------------------------------------------------------

def test_manual_mode_is_tgis_manual_linear_with_the_margin_applied_twice():
    # P = (100 - 20)/100 = 0.8; lp = 100 / (0.8 · 100 · 4) = 0.3125 (exact in binary); limit = floor(0.8 · 100) = 80.
    model = MemoryModel.from_config("manual", 20, max_sequence_length=100, max_batch_size=4, kv_pool_tokens=0)
    assert model == MemoryModel(prefill_linear=0.3125, next_token_linear=0.3125, weight_limit=80)
    # 80 / 0.3125 = 256 tokens = 64% of max_seq · max_bs = 400.
    assert not model.exceeds_weight([(0, 256)], 0)
    assert model.exceeds_weight([(0, 257)], 0)  # 257 · 0.3125 = 80.3125 > 80


def test_manual_mode_at_tgis_defaults_fits_about_64_percent():
    # max_seq 2048 × max_bs 12 = 24576 tokens; 0.64 · 24576 = 15728.64.
    model = MemoryModel.from_config("manual", 20, max_sequence_length=2048, max_batch_size=12, kv_pool_tokens=0)
    assert model.weight_limit == 80
    assert not model.exceeds_weight([(0, 15728)], 0)  # 15728 · 100/19660.8 = 79.997
    assert model.exceeds_weight([(0, 15729)], 0)  # 80.002
    model.check_startup(2048)  # prefill of 2048 tokens weighs int(10.4) = 10


def test_manual_coefficients_are_float32_as_tgis_sends_them():
    # lp = 100 / (0.8 · 250 · 10) = 0.05, which TGIS's protobuf float rounds to 0.0500000007450580596923828125.
    model = MemoryModel.from_config("manual", 20, max_sequence_length=250, max_batch_size=10, kv_pool_tokens=0)
    assert model.next_token_linear == 0.0500000007450580596923828125
    # 1600 tokens: 80.0000012 — truncated to 80 by batch_max_weight, but over 80 in exceeds_weight's float compare.
    assert model.batch_max_weight(1600, 0) == 80
    assert model.exceeds_weight([(0, 1600)], 0)
    assert not model.exceeds_weight([(0, 1599)], 0)  # 79.95


def test_weights_truncate_to_integers():
    model = MemoryModel(prefill_linear=0.5, next_token_linear=0.3125, weight_limit=80)
    assert model.batch_max_weight(10, 3) == 4  # (10 + 3) · 0.3125 = 4.0625
    assert model.initial_weight(7) == 2  # 7 · 0.3125 = 2.1875
    assert model.prefill_weight(7) == 3  # 7 · 0.5 = 3.5


def test_auto_mode_weighs_kv_token_positions_against_the_block_pool():
    # floor((1 - 20/100) · 1000) = 800; floor(0.75 · 4096) = 3072.
    assert MemoryModel.from_config("auto", 20, 2048, 12, kv_pool_tokens=1000) == MemoryModel(1.0, 1.0, 800)
    assert MemoryModel.from_config("auto", 25, 2048, 12, kv_pool_tokens=4096).weight_limit == 3072
    assert MemoryModel.from_config("auto", 0, 2048, 12, kv_pool_tokens=4096).weight_limit == 4096
    with pytest.raises(ValueError, match="leaves no room"):
        MemoryModel.from_config("auto", 20, 2048, 12, kv_pool_tokens=1)  # floor(0.8) = 0


def test_off_mode_has_no_limit():
    model = MemoryModel.from_config("off", 20, 2048, 12, kv_pool_tokens=0)
    assert model == MemoryModel(0.0, 0.0, 0)
    assert not model.exceeds_weight([(10**6, 10**6)] * 100, 10**6)
    model.check_startup(10**9)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="valid options for ESTIMATE_MEMORY are auto, manual, and off"):
        MemoryModel.from_config("measure", 20, 2048, 12, 1000)
    with pytest.raises(ValueError, match=r"batch_safety_margin must be a percentage in \[0, 100\), got 100"):
        MemoryModel.from_config("manual", 100, 2048, 12, 1000)


def test_startup_check_has_tgis_messages():
    # Manual with max_bs 1: lp = 100 / (0.8 · 100) = 1.25, a 100-token prefill weighs 125 > 80.
    manual = MemoryModel.from_config("manual", 20, max_sequence_length=100, max_batch_size=1, kv_pool_tokens=0)
    with pytest.raises(ValueError) as info:
        manual.check_startup(100)
    assert str(info.value) == ("The provided max_sequence length (100) results in a prefill batch weight "
                               "that exceeds the estimated capacity (80)")
    # Prefill 100 · 0.5 = 50 fits; next-token 100 · 1.0 = 100 does not.
    with pytest.raises(ValueError) as info:
        MemoryModel(prefill_linear=0.5, next_token_linear=1.0, weight_limit=80).check_startup(100)
    assert str(info.value) == ("The provided max_sequence length (100) results in a next-token batch weight "
                               "that exceeds the estimated capacity (80)")
    # Auto: a pool of 2560 tokens with margin 20 admits 2048 exactly.
    MemoryModel.from_config("auto", 20, 2048, 12, kv_pool_tokens=2560).check_startup(2048)
    with pytest.raises(ValueError, match=r"\(2049\) results in a prefill batch weight .* capacity \(2048\)"):
        MemoryModel.from_config("auto", 20, 2049, 12, kv_pool_tokens=2560).check_startup(2049)


def test_exceeds_weight_walks_from_the_longest_remaining_output():
    model = MemoryModel(1.0, 1.0, weight_limit=100)
    # Sorted by remaining out, descending: (30, 20), (20, 5), (10, 50).
    #   k=1: S=20, 20 + 1·30 = 50;  k=2: S=25, 25 + 2·20 = 65;  k=3: S=75, 75 + 3·10 = 105 > 100.
    shapes = [(10, 50), (30, 20), (20, 5)]
    assert model.exceeds_weight(shapes, 30)
    assert not MemoryModel(1.0, 1.0, weight_limit=105).exceeds_weight(shapes, 30)  # equal to the limit fits


def test_exceeds_weight_checks_only_points_at_or_below_the_candidate_output():
    model = MemoryModel(1.0, 1.0, weight_limit=100)
    # (200, 10) alone would be 210, but its out 200 > candidate 5: that point was checked when it was admitted.
    assert not model.exceeds_weight([(200, 10), (5, 10)], 5)  # k=2: S=20, 20 + 2·5 = 30
    assert model.exceeds_weight([(200, 10), (5, 10)], 200)


def test_exceeds_weight_without_a_limit_is_false():
    assert not MemoryModel(1.0, 1.0, weight_limit=0).exceeds_weight([(10**6, 10**6)], 10**6)


# --- try_next_batch -----------------------------------------------------------------------------------------------

AUTO_800 = MemoryModel(1.0, 1.0, weight_limit=800)  # auto with a 1000-token pool and margin 20
NOW = 2.0  # after every queue time below; the policy itself compares queue times only


def test_queue_jumping_until_the_cutoff_and_the_counters():
    waiting = [
        Seq(700, 50, queued_at=0.0),   # A: worst case 750 ≤ 800, picked
        Seq(100, 50, queued_at=0.5),   # B: 900 > 800; granular: k=2 S=800 + 2·50 = 900 > 800 → skipped, cutoff 1.5
        Seq(10, 5, queued_at=1.0),     # C: 710 + 55 = 765 ≤ 800, no granular check; jumps B
        Seq(20, 20, queued_at=1.25),   # D: 730 + 75 = 805 > 800; granular (50,700) skip, (20,20) k=2 720+40=760,
                                       #    (5,10) k=3 730+15=745 → fits; jumps B
        Seq(1, 1, queued_at=1.5),      # E: at the cutoff exactly, still considered; (1,1) k=4 731+4=735 → fits
        Seq(1, 1, queued_at=1.75),     # F: queued after the cutoff → the walk stops, though it would fit
    ]
    result = try_next_batch(waiting, [], min_size=1, size_limit=12, model=AUTO_800, now=NOW)
    assert names(waiting, result.picked) == [0, 2, 3, 4]
    assert (result.queue_jumps, result.granular_additions, result.prefill_weight_exceeded) == (3, 2, 0)


def test_entries_picked_after_a_granular_check_stay_in_it():
    model = MemoryModel(1.0, 1.0, weight_limit=100)
    waiting = [
        Seq(60, 20),  # X: 80, picked
        Seq(10, 5),   # Y: 70 + 25 = 95, picked without a granular check
        Seq(4, 4),    # Z: 74 + 29 = 103 > 100; granular over (20,60) (5,10) (4,4): k=3 74 + 12 = 86 → fits
        Seq(11, 4),   # V: 85 + 33 > 100; (20,60) (5,10) (4,11) (4,4): k=3 81 + 12 = 93, k=4 85 + 16 = 101 → skipped
    ]
    result = try_next_batch(waiting, [], 1, 12, model, now=NOW)
    assert names(waiting, result.picked) == [0, 1, 2]
    assert result.granular_additions == 1


def test_running_entries_count_their_generated_tokens():
    # Limit 200: R has 100 + 40 tokens now and 10 to go → shape (10, 140).
    model = MemoryModel(1.0, 1.0, weight_limit=200)
    running = [Seq(100, 50, generated=40)]
    fits = Seq(40, 15)   # granular: (15,40) k=1 55; (10,140) k=2 180 + 20 = 200 ≤ 200
    over = Seq(41, 15)   # (10,140) k=2 181 + 20 = 201 > 200 (would fit if R were counted as (50, 100))
    assert try_next_batch([fits], running, 1, 12, model, now=NOW).picked == [fits]
    result = try_next_batch([over], running, 1, 12, model, now=NOW)
    assert result.picked == []
    assert result.granular_additions == 0


def test_prefill_limit_skips_count_twice_and_set_the_cutoff():
    # Prefill weighs 2 per token, limit 1000, nothing running → the prefill limit is the whole 1000.
    model = MemoryModel(prefill_linear=2.0, next_token_linear=1.0, weight_limit=1000)
    waiting = [
        Seq(300, 10, queued_at=0.0),   # A: prefill 600, picked
        Seq(300, 10, queued_at=0.5),   # B: prefill (300+300)·2 = 1200 > 1000 → skipped, counted 2, cutoff 1.5
        Seq(250, 10, queued_at=0.75),  # C: a queue jump (counted) that then fails prefill: 1100 > 1000, 2 more
        Seq(100, 10, queued_at=1.0),   # D: jump, prefill 800, picked
        Seq(1, 10, queued_at=1.5),     # E: jump, prefill 802, picked
        Seq(1, 10, queued_at=1.75),    # F: after the cutoff
    ]
    result = try_next_batch(waiting, [], 1, 12, model, now=NOW)
    assert names(waiting, result.picked) == [0, 3, 4]
    assert (result.queue_jumps, result.granular_additions, result.prefill_weight_exceeded) == (3, 0, 4)


def test_prefill_limit_is_the_share_the_running_batch_leaves():
    # Running: 550 + 50 generated = 600 tokens now → prefill limit (1 − 600/1000) · 1000 = 400.
    model = MemoryModel(prefill_linear=2.0, next_token_linear=1.0, weight_limit=1000)
    running = [Seq(550, 100, generated=50)]
    waiting = [Seq(201, 10, queued_at=0.0), Seq(200, 10, queued_at=0.5)]  # prefill 402 > 400; 400 fits
    result = try_next_batch(waiting, running, 1, 12, model, now=NOW)
    assert names(waiting, result.picked) == [1]
    assert (result.queue_jumps, result.prefill_weight_exceeded) == (1, 2)
    assert names(waiting, try_next_batch(waiting, [], 1, 12, model, now=NOW).picked) == [0, 1]  # alone: limit 1000


def test_nothing_when_the_running_batch_leaves_no_prefill_room():
    # Running initial weight int(2000 · 0.5) = 1000 = the limit → prefill limit 0.
    model = MemoryModel(prefill_linear=1.0, next_token_linear=0.5, weight_limit=1000)
    result = try_next_batch([Seq(1, 1)], [Seq(2000, 10)], 1, 12, model, now=NOW)
    assert result.picked == []
    assert (result.queue_jumps, result.granular_additions, result.prefill_weight_exceeded) == (0, 0, 0)


def test_gives_up_when_the_rest_of_the_queue_cannot_reach_min_size():
    big, too_big, small = Seq(700, 50), Seq(100, 50), Seq(10, 5)  # too_big: 900 > 800 (see the jumping test)
    # min_size 2: after skipping too_big, 1 picked + 0 left < 2 → nothing at all, not even big.
    assert try_next_batch([big, too_big], [], 2, 12, AUTO_800, now=NOW).picked == []
    # With one more behind it, 1 + 1 ≥ 2: skip and go on.
    assert try_next_batch([big, too_big, small], [], 2, 12, AUTO_800, now=NOW).picked == [big, small]


def test_min_size_is_not_checked_again_at_the_end():
    # The second entry is skipped by the prefill check, which does not test min_size: a batch of 1 < 2 comes back.
    model = MemoryModel(prefill_linear=2.0, next_token_linear=1.0, weight_limit=1000)
    first = Seq(300, 10)
    assert try_next_batch([first, Seq(300, 10)], [], 2, 12, model, now=NOW).picked == [first]


def test_min_size_and_size_limit():
    waiting = [Seq(10, 10) for _ in range(3)]
    running = [Seq(10, 10) for _ in range(3)]
    assert try_next_batch(waiting[:1], [], 2, 12, AUTO_800, now=NOW).picked == []  # 1 waiting < min_size 2
    assert try_next_batch(waiting, running, 2, 4, AUTO_800, now=NOW).picked == []  # 3 running + 2 > 4
    assert try_next_batch(waiting, running, 1, 4, AUTO_800, now=NOW).picked == waiting[:1]  # stops at the size limit


def test_off_mode_limits_by_batch_size_only():
    off = MemoryModel.from_config("off", 20, 2048, 12, kv_pool_tokens=0)
    waiting = [Seq(10**6, 10**6, queued_at=i) for i in range(10)]
    result = try_next_batch(waiting, [Seq(10**6, 10**6)] * 2, 1, 5, off, now=NOW)
    assert result.picked == waiting[:3]
    assert (result.queue_jumps, result.granular_additions, result.prefill_weight_exceeded) == (0, 0, 0)


# --- the knobs ----------------------------------------------------------------------------------------------------

def test_launcher_knobs_reach_the_scheduler_config(tmp_path):
    launcher = Launcher(LauncherConfig(estimate_memory="manual", batch_safety_margin=30, ipc_dir=str(tmp_path)), {})
    config = config_from_namespace(SchedulerConfig, argparse.Namespace(), launcher.env)
    assert (config.estimate_memory, config.batch_safety_margin) == ("manual", 30)
    assert (SchedulerConfig().estimate_memory, SchedulerConfig().batch_safety_margin) == ("auto", 20)


def test_launcher_refuses_a_bad_mode_and_no_longer_warns_about_the_margin(caplog):
    with pytest.raises(SystemExit, match="valid options for ESTIMATE_MEMORY are auto, manual, and off"):
        check_config(LauncherConfig(estimate_memory="measure"))
    check_config(LauncherConfig(batch_safety_margin=10))
    assert "batch-safety-margin" not in caplog.text
