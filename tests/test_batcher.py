"""Scheduler batching decisions, block pool and stop conditions, without sockets or a model."""

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
from services.scheduler.batcher import Batcher as _Batcher
from services.scheduler.blocks import BlockManager

EOS = 2
GW = b"gw"


def Batcher(max_batch_size: int, max_waiting_tokens: int, eos_token_id: int, num_blocks: int = 64,
            block_size: int = 4, **kwargs) -> _Batcher:  # noqa: N802 - stands in for the class
    return _Batcher(max_batch_size, max_waiting_tokens, eos_token_id, BlockManager(num_blocks, block_size), **kwargs)


def request(rid: str, max_new: int = 5, min_new: int = 0, deadline: float = 0.0, limited: bool = False):
    return GenerateRequest(rid, token_ids([1, 3, 4]), LogitsParams(), StopParams(max_new, min_new, deadline, limited), 0)


def run_step(batcher: Batcher, tokens: dict[str, int] | None = None):
    step = batcher.schedule()
    assert step is not None
    ids = [chunk.request_id for chunk in step.run if chunk.start + chunk.count == len(batcher.running[chunk.request_id].tokens)]
    outputs = [SequenceOutput(rid, TokenDetail((tokens or {}).get(rid, 9))) for rid in ids]
    forwarded, failures = batcher.complete_step(outputs)
    assert not failures
    return step, forwarded


def test_first_batch_takes_up_to_max_batch_size():
    b = Batcher(max_batch_size=2, max_waiting_tokens=4, eos_token_id=EOS)
    b.submit(GW, [request("a"), request("b"), request("c")])
    step, _ = run_step(b)
    assert [s.request_id for s in step.add] == ["a", "b"]
    assert [(c.request_id, c.start, c.count) for c in step.run] == [("a", 0, 3), ("b", 0, 3)]
    assert [s.request_id for s in b.waiting] == ["c"]


def test_finished_sequence_leaves_and_waiting_one_joins_between_decode_steps():
    b = Batcher(max_batch_size=2, max_waiting_tokens=1, eos_token_id=EOS)
    b.submit(GW, [request("a", max_new=1), request("b", max_new=5)])
    _, forwarded = run_step(b)
    assert {o.request_id: o.stop_reason for _, o in forwarded} == {"a": StopReason.MAX_TOKENS,
                                                                     "b": StopReason.NOT_FINISHED}
    b.submit(GW, [request("c")])
    step, _ = run_step(b)
    assert step.remove == ["a"] and [s.request_id for s in step.add] == ["c"]
    assert [(c.request_id, c.start, c.count) for c in step.run] == [("b", 3, 1), ("c", 0, 3)]


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
    forwarded, _ = b.complete_step([SequenceOutput("a", TokenDetail(9)), SequenceOutput("b", TokenDetail(9))])
    assert [o.request_id for _, o in forwarded] == ["b"]


def test_gauges_after_step():
    b = Batcher(max_batch_size=2, max_waiting_tokens=1, eos_token_id=EOS)
    b.submit(GW, [request("a", max_new=1)])
    b.schedule()
    stats = b.stats(0.1, 0.05)
    b.complete_step([SequenceOutput("a", TokenDetail(9))])
    b.fill_gauges(stats)
    assert stats.prefill_tokens == 3
    assert (stats.method, stats.batch_size, stats.running, stats.queue_size) == ("prefill", 1, 0, 0)


def test_long_prompt_is_chunked_beside_decodes():
    b = Batcher(max_batch_size=4, max_waiting_tokens=1, eos_token_id=EOS, max_prefill_tokens=8)
    b.submit(GW, [request("short", max_new=50)])
    run_step(b)
    b.submit(GW, [GenerateRequest("long", token_ids(range(1, 21)), LogitsParams(), StopParams(5), 0)])
    chunks = [[(c.request_id, c.start, c.count) for c in run_step(b)[0].run] for _ in range(4)]
    assert chunks == [[("short", 3, 1), ("long", 0, 8)], [("short", 4, 1), ("long", 8, 8)],
                      [("short", 5, 1), ("long", 16, 4)], [("short", 6, 1), ("long", 20, 1)]]


def test_long_prompt_chunks_shrink_while_others_decode():
    b = Batcher(max_batch_size=6, max_waiting_tokens=1, eos_token_id=EOS, max_prefill_tokens=8,
                max_prefill_tokens_while_decoding=3)
    b.submit(GW, [GenerateRequest("long", token_ids(range(1, 12)), LogitsParams(), StopParams(9), 0)])
    b.submit(GW, [GenerateRequest("next", token_ids(range(20, 27)), LogitsParams(), StopParams(9), 0),
                  GenerateRequest("details", token_ids(range(30, 36)), LogitsParams(input_details=True),
                                  StopParams(9), 0)])
    steps = [[(c.request_id, c.start, c.count) for c in run_step(b)[0].run] for _ in range(3)]
    assert steps == [
        [("long", 0, 8)],  # nobody decodes: the whole budget
        [("long", 8, 3), ("next", 0, 5)],
        # "long" decodes: what is left of "next" fits the cap and runs whole; input details need the whole prompt
        # in one chunk and only the step's budget applies to it (steady decoding cannot starve it)
        [("long", 11, 1), ("next", 5, 2), ("details", 0, 6)],
    ]
    b.submit(GW, [GenerateRequest("big", token_ids(range(40, 50)), LogitsParams(), StopParams(9), 0),
                  GenerateRequest("tiny", token_ids(range(50, 53)), LogitsParams(), StopParams(9), 0)])
    steps = [[(c.request_id, c.start, c.count) for c in run_step(b)[0].run][3:] for _ in range(3)]
    # After the first three decodes: 3 tokens a step of the long prompt; the short one joins whole beside it
    # (then decodes, listed before the prompt chunks).
    assert steps == [[("big", 0, 3), ("tiny", 0, 3)], [("tiny", 3, 1), ("big", 3, 3)], [("tiny", 4, 1), ("big", 6, 3)]]


def test_blocks_freed_on_stop_and_cached_prefix_reused():
    b = Batcher(max_batch_size=4, max_waiting_tokens=1, eos_token_id=EOS, num_blocks=8, block_size=2)
    prompt = token_ids([5, 6, 7, 8, 9])
    b.submit(GW, [GenerateRequest("a", prompt, LogitsParams(), StopParams(1), 0)])
    step, _ = run_step(b)
    assert list(step.run[0].block_table) == [0, 1, 2]
    assert b.blocks.num_free == 8 and not b.running  # stopped after its one token: its blocks are free
    b.submit(GW, [GenerateRequest("b", prompt, LogitsParams(), StopParams(1), 0)])
    step, _ = run_step(b)
    assert step.remove == ["a"]
    assert (step.run[0].start, step.run[0].count) == (4, 1)  # two cached blocks, the last token computed
    assert b.plan.counters["prefix_hit_tokens"] == 4


def test_out_of_blocks_preempts_the_newest_and_resumes_it():
    b = Batcher(max_batch_size=4, max_waiting_tokens=1, eos_token_id=EOS, num_blocks=4, block_size=2)
    b.submit(GW, [request("old", max_new=4), request("new", max_new=4)])  # 3 prompt tokens: 2 blocks each
    run_step(b)
    run_step(b)  # position 3 still fits in two blocks
    step, _ = run_step(b)  # position 4: "old" needs a third block, "new" is preempted
    assert [c.request_id for c in step.run] == ["old"] and [s.request_id for s in b.waiting] == ["new"]
    assert b.plan.counters["preemptions"] == 1 and "new" not in step.remove  # the workers keep its state
    while "old" in b.running:
        run_step(b)
    step, _ = run_step(b)
    # Resumed from the blocks "old" left cached: both hold 1 3 4 9 (same prompt, same tokens).
    assert [(c.request_id, c.start) for c in step.run] == [("new", 4)]
    assert step.add == []


def test_a_request_the_worker_refuses_fails_alone():
    b = Batcher(max_batch_size=4, max_waiting_tokens=1, eos_token_id=EOS)
    b.submit(GW, [request("good"), request("bad")])
    b.schedule()
    forwarded, failures = b.complete_step([SequenceOutput("good", TokenDetail(9))], {"bad": "token ids outside"})
    assert [o.request_id for _, o in forwarded] == ["good"]
    assert [(s.request_id, m) for s, m in failures] == [("bad", "token ids outside")]
    assert list(b.running) == ["good"] and b.blocks.num_free == 64 - 1
