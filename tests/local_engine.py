"""The scheduler's batcher and block pool driving a worker engine in one process (no sockets), for tests."""

from __future__ import annotations

from collections import Counter

from services.common.protocol import GenerateRequest, LogitsParams, StopParams, StopReason, token_ids
from services.scheduler.batcher import Batcher
from services.scheduler.blocks import BlockManager
from services.worker.engine import Engine


class LocalEngine:
    """Runs requests to completion through the real `Batcher` and `Engine`, as the scheduler process would."""

    def __init__(self, engine: Engine, *, num_blocks: int | None = None, max_batch_size: int = 16,
                 max_prefill_tokens: int = 512, prefix_caching: bool = True, max_waiting_tokens: int = 24) -> None:
        self.engine = engine
        blocks = BlockManager(num_blocks or engine.cache.num_blocks, engine.cache.block_size, prefix_caching)
        self.batcher = Batcher(max_batch_size, max_waiting_tokens, engine.eos_id, blocks,
                               max_prefill_tokens=max_prefill_tokens, max_loras=engine.model_info().max_loras)
        self.steps = []
        self.failures: dict[str, str] = {}
        self.stop_reasons: dict[str, StopReason] = {}
        self.counters: Counter[str] = Counter()  # the batcher's per-step counters, summed

    def generate(self, prompts: dict[str, list[int]], max_new_tokens: int,
                 params: LogitsParams | None = None, min_new_tokens: int | None = None) -> dict[str, list[int]]:
        """Greedy (or `params`) tokens per request id; all requests queued at once."""
        min_new = max_new_tokens if min_new_tokens is None else min_new_tokens
        requests = [GenerateRequest(rid, token_ids(ids), params or LogitsParams(),
                                    StopParams(max_new_tokens, min_new), 0.0) for rid, ids in prompts.items()]
        self.batcher.submit(b"local", requests)
        return self.run({rid: [] for rid in prompts})

    def run(self, got: dict[str, list[int]]) -> dict[str, list[int]]:
        """Step until nothing is waiting or running; tokens go into `got`."""
        while self.step_once(got):
            pass
        return got

    def step_once(self, got: dict[str, list[int]]) -> bool:
        """Schedule and run one step (False when there is nothing to do); tokens go into `got`."""
        step = self.batcher.schedule()
        if step is None:
            return False
        self.steps.append(step)
        self.counters.update(self.batcher.plan.counters)
        result = self.engine.step(step)
        forwarded, failures = self.batcher.complete_step(result.outputs, result.failed)
        for sequence, message in failures:
            self.failures[sequence.request_id] = message
        for sequence, output in forwarded:
            got.setdefault(sequence.request_id, []).extend(t.token_id for t in output.tokens)
            if output.stop_reason != StopReason.NOT_FINISHED:
                self.stop_reasons[sequence.request_id] = output.stop_reason
        return True
