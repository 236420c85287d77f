"""Scheduler batching decisions and stop conditions, without sockets or a model."""

from __future__ import annotations

import time

from services.common.protocol import (
    GenerateRequest,
    LogitsParams,
    SequenceOutput,
    StopParams,
    StopReason,
    TokenDetail,
    token_ids,
)
from services.scheduler.batcher import Batcher

EOS = 2
GW = b"gw"


def request(rid: str, max_new: int = 5, min_new: int = 0, deadline: float = 0.0, limited: bool = False):
    return GenerateRequest(rid, token_ids([1, 3, 4]), LogitsParams(), StopParams(max_new, min_new, deadline, limited), 0)


def run_step(batcher: Batcher, tokens: dict[str, int] | None = None):
    step = batcher.schedule()
    assert step is not None
    ids = list(batcher.running)
    outputs = [SequenceOutput(rid, TokenDetail((tokens or {}).get(rid, 9))) for rid in ids]
    return step, batcher.complete_step(outputs)


def test_first_batch_takes_up_to_max_batch_size():
    b = Batcher(max_batch_size=2, max_waiting_tokens=4, eos_token_id=EOS)
    b.submit(GW, [request("a"), request("b"), request("c")])
    step, _ = run_step(b)
    assert [s.request_id for s in step.add] == ["a", "b"] and not step.decode
    assert [s.request_id for s in b.waiting] == ["c"]


def test_finished_sequence_leaves_and_waiting_one_joins_between_decode_steps():
    b = Batcher(max_batch_size=2, max_waiting_tokens=1, eos_token_id=EOS)
    b.submit(GW, [request("a", max_new=1), request("b", max_new=5)])
    _, forwarded = run_step(b)
    assert {o.request_id: o.stop_reason for _, o in forwarded} == {"a": StopReason.MAX_TOKENS,
                                                                     "b": StopReason.NOT_FINISHED}
    b.submit(GW, [request("c")])
    step, _ = run_step(b)
    assert step.remove == ["a"] and [s.request_id for s in step.add] == ["c"] and step.decode


def test_min_join_size_waits_for_enough_requests():
    b = Batcher(max_batch_size=8, max_waiting_tokens=10, eos_token_id=EOS)
    b.submit(GW, [request(f"r{i}", max_new=50) for i in range(4)])
    run_step(b)
    b.submit(GW, [request("late", max_new=50)])
    # 4 running, 1 waiting token so far: min size = 4 * (10 - 1) // 10 = 3 > 1 waiting, so nobody joins.
    step, _ = run_step(b)
    assert step.add == []
    # After max_waiting_tokens decode steps a single waiting request joins.
    for _ in range(10):
        step, _ = run_step(b)
        if step.add:
            break
    assert [s.request_id for s in step.add] == ["late"]


def test_stop_order_time_limit_min_tokens_eos_max():
    b = Batcher(max_batch_size=4, max_waiting_tokens=1, eos_token_id=EOS)
    b.submit(GW, [request("timed", deadline=time.time() - 1, min_new=3),
                  request("min", min_new=2), request("eos"), request("limited", max_new=1, limited=True)])
    _, forwarded = run_step(b, {"timed": 9, "min": EOS, "eos": EOS})
    reasons = {o.request_id: o.stop_reason for _, o in forwarded}
    assert reasons == {"timed": StopReason.TIME_LIMIT, "min": StopReason.NOT_FINISHED,
                       "eos": StopReason.EOS_TOKEN, "limited": StopReason.TOKEN_LIMIT}


def test_deadline_in_queue_ends_with_no_tokens():
    b = Batcher(max_batch_size=1, max_waiting_tokens=1, eos_token_id=EOS)
    b.submit(GW, [request("running", max_new=50), request("queued", deadline=time.time() + 0.01)])
    run_step(b)
    time.sleep(0.02)
    finished = b.expire_waiting()
    assert [(f.output.request_id, f.output.generated_count, f.output.stop_reason) for f in finished] == [
        ("queued", 0, StopReason.TIME_LIMIT)]
    assert not b.waiting


def test_cancel_running_removes_it_in_next_step_and_ignores_late_output():
    b = Batcher(max_batch_size=2, max_waiting_tokens=1, eos_token_id=EOS)
    b.submit(GW, [request("a", max_new=50), request("b", max_new=50)])
    run_step(b)
    b.cancel(["a"])
    step = b.schedule()
    assert step.remove == ["a"]
    forwarded = b.complete_step([SequenceOutput("a", TokenDetail(9)), SequenceOutput("b", TokenDetail(9))])
    assert [o.request_id for _, o in forwarded] == ["b"]


def test_gauges_after_step():
    b = Batcher(max_batch_size=2, max_waiting_tokens=1, eos_token_id=EOS)
    b.submit(GW, [request("a", max_new=1)])
    b.schedule()
    stats = b.stats(0.1, 0.05)
    b.complete_step([SequenceOutput("a", TokenDetail(9))])
    b.fill_gauges(stats)
    assert (stats.method, stats.batch_size, stats.running, stats.queue_size) == ("prefill", 1, 0, 0)
