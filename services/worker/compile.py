"""PT2_COMPILE: the model's forward through torch.compile (dynamo + inductor), warmed up at start-up.

What compiling buys: a forward pass is ~45 small operations per layer
around the matmuls (norms, rotary, SiLU, residual adds, splits, casts); at
batch 1 on a CPU their per-op overhead is a quarter of the step.  Inductor
fuses them into a few generated C++ loops.  Attention stays one opaque op
(`tgis::paged_attention`, see `paged_attention.py`) because its Python reads
the step's block tables, so the traced graph depends only on the number of
packed tokens T: dynamic in T, specialized for T = 1 (a single decode).

Compiling happens on the first call with a new shape class, which takes
minutes for a 30-layer model; the warm-up below runs those calls at start-up
(T = 1, T = max_batch_size, a long prefill chunk) with progress logged, so no
request pays for them.
"""

from __future__ import annotations

import logging
import time

import torch
import torch._inductor.config

from services.worker.kv_cache import PagedKVCache
from services.worker.paged_attention import PagedBatch, forward_context

logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 512  # TGIS's dynamo cache size


def pt2_compile_enabled(value: str | None) -> bool:
    """TGIS's rule: PT2_COMPILE set to anything other than `false` (any case) turns compilation on."""
    return value is not None and value.strip() != "" and value.strip().lower() != "false"


def compile_model(model: torch.nn.Module, freeze: bool = False) -> None:
    """Replace `model.forward` by its compiled version (dynamic in the number of packed tokens).

    `freeze` makes the weights constants of the graph, so inductor prepacks the float linear layers for
    oneDNN itself (bfloat16 on CPU: what `packed_linear.py` does for eager models; a prepacked weight
    reached through an opaque op would cost ~30 us a call in a dynamic-shape graph).
    """
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    # Global, not `options=`: inductor reads it outside the options' scope. Set on every call (tests compile
    # float32 and bfloat16 models in one process); the compile itself happens at the first call, in warm_up.
    torch._inductor.config.freezing = freeze
    model.forward = torch.compile(model.forward, dynamic=True, fullgraph=True)


def _warm_up_batch(cache: PagedKVCache, decodes: int, prefill: int) -> tuple[PagedBatch, torch.Tensor]:
    """A batch of `decodes` one-token decodes at position 1 and one `prefill`-token chunk from position 0, all in
    free blocks (nothing is cached before the first request, and every real step rewrites what it reads)."""
    size = cache.block_size
    prefill_blocks = list(range(max(1, -(-prefill // size))))
    tables = [[0]] * decodes + ([prefill_blocks] if prefill else [])
    starts = [1] * decodes + ([0] if prefill else [])
    counts = [1] * decodes + ([prefill] if prefill else [])
    device = cache.k[0].device
    batch = PagedBatch.build(size, tables, starts, counts, device)
    positions = torch.tensor([p for s, c in zip(starts, counts, strict=True) for p in range(s, s + c)], device=device)
    return batch, positions


def warm_up(model: torch.nn.Module, cache: PagedKVCache, max_batch_size: int, max_prefill: int) -> None:
    """Run the compiled forward once per shape class requests will hit, logging each compile."""
    max_prefill = min(max_prefill, cache.num_blocks * cache.block_size)
    shapes = [("1 decode", 1, 0), (f"{max_batch_size} decodes", max_batch_size, 0),
              (f"{max_batch_size} decodes + a {max_prefill}-token prefill", max_batch_size, max_prefill)]
    total = time.perf_counter()
    for i, (name, decodes, prefill) in enumerate(shapes, 1):
        started = time.perf_counter()
        logger.info("PT2 compile warm-up %d/%d: %s ...", i, len(shapes), name)
        # Inside inference mode, like the engine's steps: the guards check that inputs are inference tensors.
        with torch.inference_mode():
            batch, positions = _warm_up_batch(cache, decodes, prefill)
            with forward_context(batch, cache):
                model.logits(model(torch.zeros_like(positions), positions))
        logger.info("PT2 compile warm-up %d/%d done in %.1f s", i, len(shapes), time.perf_counter() - started)
    logger.info("PT2 compile warm-up finished in %.1f s", time.perf_counter() - total)
