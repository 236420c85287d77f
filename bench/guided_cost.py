"""Guided decoding's cost per step: the worker's own mask path (services/worker/guided.py) on the demo tokenizer.

Every row of a batch is constrained; each step fills the rows' bitmasks, masks
random logits in place, takes the argmax and advances the matchers, as the
engine does around its forward pass.  Unconstrained rows cost nothing (the
engine skips them), so this is the whole overhead:

    .venv/bin/python -m bench.guided_cost --batch 32 --steps 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from services.common.protocol import GuideKind, LogitsParams
from services.worker.guided import Guides

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
KINDS = {
    "json": (GuideKind.JSON, ""),
    "json_schema": (GuideKind.JSON_SCHEMA, json.dumps(SCHEMA)),
    "regex": (GuideKind.REGEX, r"[a-z]+( [a-z]+)*\."),
    "grammar": (GuideKind.GRAMMAR, 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+ | "(" expr ")"'),
}


def measure(guides: Guides, kind: str, batch: int, steps: int) -> dict[str, float]:
    """Milliseconds: the compile (not cached yet), then per step (fill + mask, accept) at `batch` constrained rows."""
    vocab_size = guides.vocab_size
    guide_kind, text = KINDS[kind]
    params = LogitsParams(guide_kind=guide_kind, guide=text)
    started = time.perf_counter()
    rows = [guides.start(params) for _ in range(batch)]
    for guide in rows:
        guide.matcher()
    compile_ms = (time.perf_counter() - started) * 1e3
    generator = torch.Generator().manual_seed(0)
    mask_s = accept_s = 0.0
    for _ in range(steps):
        scores = torch.randn(batch, vocab_size, generator=generator)
        started = time.perf_counter()
        guides.mask(scores, list(range(batch)), rows)
        mask_s += time.perf_counter() - started
        tokens = scores.argmax(dim=-1).tolist()
        started = time.perf_counter()
        for guide, token in zip(rows, tokens, strict=True):
            guide.accept(token)
        accept_s += time.perf_counter() - started
    per_step = (mask_s + accept_s) / steps * 1e3
    return {"compile_ms": compile_ms, "mask_ms": mask_s / steps * 1e3, "accept_ms": accept_s / steps * 1e3,
            "step_ms": per_step, "token_ms": per_step / batch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="constrained rows per step")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--model", help="model folder (default: the demo model)")
    args = parser.parse_args(argv)
    if args.model:
        model_path = Path(args.model)
    else:
        from services.worker.demo_model import install_demo_model

        model_path = install_demo_model()
    config = json.loads((model_path / "config.json").read_text())
    eos = config["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    guides = Guides(model_path, config["vocab_size"], eos)
    started = time.perf_counter()
    guides.start(LogitsParams(guide_kind=GuideKind.REGEX, guide="a")).matcher()
    print(f"batch {args.batch}, {args.steps} steps, vocabulary {config['vocab_size']}; "
          f"xgrammar and the tokenizer's vocabulary loaded in {(time.perf_counter() - started) * 1e3:.0f} ms")
    print("kind         compile   mask+fill/step   accept/step   per token")
    for kind in args.kinds.split(","):
        r = measure(guides, kind, args.batch, args.steps)
        print(f"{kind:<12} {r['compile_ms']:7.1f} ms {r['mask_ms']:10.2f} ms {r['accept_ms']:11.2f} ms "
              f"{r['token_ms']:9.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
