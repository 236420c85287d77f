"""LoRA's cost per token: decode steps of the demo model in the engine, every row with one adapter vs none.

A PEFT LoRA adapter (rank 8 by default, on q/k/v/o/gate/up/down, random
non-zero A and B) is made in a temp ADAPTER_CACHE; the engine runs
`--batch` sequences to their prompt's end, then times `--steps` decode steps
with no adapter and with every row on the adapter, alternating for
`--rounds` rounds; it reports the lowest of the rounds' median step times
(the machine's cores are shared, so slower rounds measure the neighbours):

    .venv/bin/python -m bench.lora_cost --batch 1 8 --steps 24 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from services.common.protocol import GenerateRequest, LogitsParams, StopParams, token_ids
from services.worker.config import WorkerConfig
from services.worker.demo_model import install_demo_model
from services.worker.engine import Engine
from tests.local_engine import LocalEngine
from tests.lora import make_adapter


def decode_ms(local: LocalEngine, batch: int, steps: int, adapter: str, tag: str) -> float:
    """Median milliseconds of one decode step of `batch` sequences (prompts of 32 tokens) using `adapter`."""
    requests = [GenerateRequest(f"{tag}-{i}", token_ids([1 + i] + list(range(100, 131))), LogitsParams(),
                                StopParams(steps + 2, steps + 2), 0.0, adapter_id=adapter) for i in range(batch)]
    local.batcher.submit(b"bench", requests)
    got: dict[str, list[int]] = {}
    times = []
    while True:
        decoding = all(s.decoding for s in local.batcher.running.values()) and local.batcher.running
        started = time.perf_counter()
        if not local.step_once(got):
            break
        if decoding and len(local.batcher.running) == batch:
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    model = install_demo_model()
    with tempfile.TemporaryDirectory() as folder:
        make_adapter(model, Path(folder) / "bench", seed=0, r=args.rank)
        engine = Engine(WorkerConfig(model_name=str(model), device="cpu", kv_cache_memory="1GiB", dtype_str=args.dtype,
                                     adapter_cache=folder, max_batch_size=max(args.batch)))
        local = LocalEngine(engine, max_batch_size=max(args.batch))
        print(f"demo model, {args.dtype}, LoRA rank {args.rank} on all 7 projections, {torch.get_num_threads()} threads")
        for batch in args.batch:
            runs = [(decode_ms(local, batch, args.steps, "", f"base{batch}-{i}"),
                     decode_ms(local, batch, args.steps, "bench", f"lora{batch}-{i}")) for i in range(args.rounds)]
            base, lora = min(r[0] for r in runs), min(r[1] for r in runs)
            print(f"batch {batch}: decode step {base:.2f} ms without, {lora:.2f} ms with the adapter "
                  f"(+{lora - base:.2f} ms, +{100 * (lora - base) / base:.0f}%; per token +{(lora - base) / batch:.2f} ms)")


if __name__ == "__main__":
    main()
