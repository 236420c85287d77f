"""Operations: the tokenizer pool scales on its own (tiny model).

The launcher starts 1 tokenizer; the test starts 2 more itself, pointed at
the launcher's ipc socket, sees work spread over all 3 in /metrics, then
SIGKILLs one while requests are in flight: every request still completes with
the reference output (its jobs are retried and its detokenizer sessions
replayed on the others), and none hangs.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from services.gateway.pb import generation_pb2 as pb
from tests import reference
from tests.pipeline import Pipeline, greedy_call

pytestmark = pytest.mark.e2e

PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "Water boils at", "In 1969,", "Dear diary"]
EXTRA = ("extra-1", "extra-2")


class Scaling:
    def __init__(self, pipeline: Pipeline, model, tmp) -> None:
        self.pipeline, self.model, self.tmp = pipeline, model, tmp
        self.extras: dict[str, subprocess.Popen] = {}

    def start_tokenizer(self, name: str) -> None:
        env = {**os.environ, "TOKENIZER_ENDPOINT": f"ipc://{self.tmp / 'ipc'}/tokenizers.sock",
               "MODEL_NAME": str(self.model), "TOKENIZER_NAME": name, "HF_HUB_OFFLINE": "1"}
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - the process owns it
        self.extras[name] = subprocess.Popen([sys.executable, "-m", "services.tokenizer.main"], env=env,
                                             stdout=log, stderr=subprocess.STDOUT)

    def handled(self) -> dict[str, float]:
        counts = {}
        for line in self.pipeline.metrics().splitlines():
            m = re.fullmatch(r'tgi_tokenizer_messages_handled\{tokenizer="([^"]+)"\} (\S+)', line)
            if m:
                counts[m[1]] = float(m[2])
        return counts

    def wait_for_pool(self, size: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.pipeline.metric("tgi_tokenizer_pool_size") != size:
            assert time.monotonic() < deadline, f"pool never reached {size}:\n{self.pipeline.logs()}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def scaling(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ops-scaling")
    p = Pipeline(tiny_model_path, tmp, "--max-sequence-length", "256", "--num-tokenizers", "1",
                 env={"TOKENIZER_HEARTBEAT_TIMEOUT_S": "1.5"}).start()
    s = Scaling(p, tiny_model_path, tmp)
    yield s
    for process in s.extras.values():
        if process.poll() is None:
            process.terminate()
            process.wait(10)
    assert p.stop() == 0, p.logs()


async def burst(pipeline: Pipeline, n: int, max_new: int, during=None):
    """n concurrent greedy calls (every third one streamed); `during` runs once all of them are running."""
    channel, stub = pipeline.aio_stub()
    async with channel:
        jobs = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        tasks = [asyncio.ensure_future(greedy_call(stub, prompt, max_new, i % 3 == 0, timeout=60))
                 for i, prompt in enumerate(jobs)]
        if during is not None:
            loop = asyncio.get_running_loop()
            deadline = time.monotonic() + 30
            while await loop.run_in_executor(None, pipeline.metric, "tgi_batch_current_size") < n:
                assert time.monotonic() < deadline, "the requests never ran together"
                await asyncio.sleep(0.02)
            during()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
    return jobs, results


def assert_reference(model, jobs, results, max_new: int) -> None:
    for prompt, result in zip(jobs, results, strict=True):
        e = reference.greedy(model, prompt, max_new)
        assert result == (e.text, e.generated_token_count, e.stop_reason), prompt


def test_added_tokenizers_join_and_share_the_work(scaling):
    assert scaling.pipeline.metric("tgi_tokenizer_pool_size") == 1
    for name in EXTRA:
        scaling.start_tokenizer(name)
    scaling.wait_for_pool(3)
    before = scaling.handled()
    jobs, results = asyncio.run(burst(scaling.pipeline, 12, 20))
    assert_reference(scaling.model, jobs, results, 20)
    after = scaling.handled()
    assert set(after) == {"tokenizer-1", *EXTRA}
    for name in after:
        assert after[name] - before.get(name, 0) > 0, (name, before, after)


def test_killed_tokenizer_loses_no_request(scaling):
    scaling.wait_for_pool(3)
    victim = scaling.extras["extra-1"]
    jobs, results = asyncio.run(burst(scaling.pipeline, 12, 80, during=lambda: os.kill(victim.pid, signal.SIGKILL)))
    assert victim.wait(10) == -signal.SIGKILL
    assert_reference(scaling.model, jobs, results, 80)
    scaling.wait_for_pool(2)
    logs = scaling.pipeline.logs()
    # Dropped when its connection closes (ipc: at once) or, failing that, after missed heartbeats.
    moved = re.search(r"tokenizer extra-1 left the pool \((?:connection closed|no heartbeat[^)]*)\); "
                      r"moving (\d+) job\(s\) and (\d+) session", logs)
    assert moved and int(moved[2]) > 0, logs
    # The two that are left serve on; the launcher only replaces its own children.
    assert "starting a replacement" not in logs
    r = scaling.pipeline.stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=PROMPTS[0])],
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=10))), timeout=30).responses[0]
    e = reference.greedy(scaling.model, PROMPTS[0], 10)
    assert (r.text, r.generated_token_count, r.stop_reason) == (e.text, e.generated_token_count, e.stop_reason)
    assert scaling.pipeline.health()[0] == 200

