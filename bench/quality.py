"""Quality of each weight format against float32: greedy agreement on fixed prompts, and perplexity on a fixed text.

For every format a server is launched (`bench.launch.LaunchedServer`), asked the
same greedy completions through gRPC, and asked for the log-probabilities of
the input tokens of `data/quality_text.txt`. float32 always runs first: it is
the reference the other formats are compared with.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import time
from pathlib import Path

import grpc

from bench.launch import LaunchedServer
from bench.report import quality_table
from services.common.model_path import DEMO_MODEL
from services.gateway.pb import generation_pb2 as pb
from services.gateway.pb import generation_pb2_grpc

log = logging.getLogger("bench.quality")

DATA = Path(__file__).with_name("data")
# Launcher arguments of each format. The quantized formats run bfloat16 everywhere else too (their fast set-up);
# their matmuls take bfloat16 activations whatever --dtype-str says.
FORMATS: dict[str, list[str]] = {
    "fp32": ["--dtype-str", "float32"],
    "bf16": ["--dtype-str", "bfloat16"],
    "int8": ["--dtype-str", "bfloat16", "--quantize", "int8"],
    "int4": ["--dtype-str", "bfloat16", "--quantize", "int4"],
}
START_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 1800.0


def load_prompts(count: int) -> list[str]:
    """The first `count` of the shipped prompts (64 of them)."""
    prompts = [line for line in (DATA / "quality_prompts.txt").read_text().splitlines() if line.strip()]
    if count > len(prompts):
        raise ValueError(f"only {len(prompts)} quality prompts are shipped, {count} asked")
    return prompts[:count]


def greedy_tokens(stub: generation_pb2_grpc.GenerationServiceStub, prompts: list[str], tokens: int) -> list[list[str]]:
    """Each prompt's greedy completion of exactly `tokens` tokens (EOS masked until then), as token strings."""
    params = pb.Parameters(method=pb.GREEDY, stopping=pb.StoppingCriteria(min_new_tokens=tokens, max_new_tokens=tokens),
                           response=pb.ResponseOptions(generated_tokens=True))
    request = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=p) for p in prompts], params=params)
    responses = stub.Generate(request, timeout=REQUEST_TIMEOUT_S).responses
    return [[token.text for token in response.tokens] for response in responses]


def perplexity(stub: generation_pb2_grpc.GenerationServiceStub, text: str) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of the text's tokens after the first, from the input-token logprobs."""
    params = pb.Parameters(method=pb.GREEDY, stopping=pb.StoppingCriteria(max_new_tokens=1),
                           response=pb.ResponseOptions(input_tokens=True, token_logprobs=True))
    request = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=text)], params=params)
    tokens = stub.Generate(request, timeout=REQUEST_TIMEOUT_S).responses[0].input_tokens
    logprobs = [token.logprob for token in tokens[1:]]  # the first input token has no prediction (NaN)
    return math.exp(-sum(logprobs) / len(logprobs)), len(logprobs)


def agreement(reference: list[list[str]], other: list[list[str]]) -> tuple[float, float]:
    """(share of reference tokens matched before the first divergence, share of identical completions)."""
    matched = total = identical = 0
    for ref, out in zip(reference, other, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b), min(len(ref), len(out)))
        matched, total = matched + same, total + len(ref)
        identical += ref == out
    return matched / max(total, 1), identical / max(len(reference), 1)


def measure_format(model: str, name: str, prompts: list[str], tokens: int, launcher_args: list[str]) -> dict:
    """Launch a server with the format's arguments and take its completions and perplexity."""
    started = time.monotonic()
    server = LaunchedServer(model, [*FORMATS[name], *launcher_args]).start(START_TIMEOUT_S)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            generate_started = time.monotonic()
            completions = greedy_tokens(stub, prompts, tokens)
            generate_s = time.monotonic() - generate_started
            ppl, scored = perplexity(stub, (DATA / "quality_text.txt").read_text())
    finally:
        server.stop()
    log.info("%s: done in %.0f s", name, time.monotonic() - started)
    return {"format": name, "completions": completions, "perplexity": ppl, "scored_tokens": scored,
            "generate_s": generate_s}


def run_quality(model: str, formats: list[str], prompts: int = 64, tokens: int = 64,
                launcher_args: list[str] = []) -> list[dict]:  # noqa: B006 (never mutated)
    """One row per format (fp32 first, always): greedy agreement with fp32 and perplexity."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")
    texts = load_prompts(prompts)
    names = ["fp32", *(f for f in dict.fromkeys(formats) if f != "fp32")]
    results = [measure_format(model, name, texts, tokens, launcher_args) for name in names]
    reference = results[0]
    rows = []
    for result in results:
        tokens_agree, identical = agreement(reference["completions"], result["completions"])
        rows.append({"format": result["format"], "args": " ".join(FORMATS[result["format"]]),
                     "greedy_token_agreement": tokens_agree, "identical_outputs": identical,
                     "perplexity": result["perplexity"], "ppl_vs_fp32": result["perplexity"] / reference["perplexity"],
                     "generate_s": result["generate_s"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEMO_MODEL, help="hub id (local cache) or folder")
    parser.add_argument("--formats", default="bf16,int8,int4", help=f"comma-separated, of {','.join(FORMATS)}")
    parser.add_argument("--prompts", type=int, default=64, help="prompts (of the 64 shipped)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--launcher-arg", action="append", default=[],
                        help="extra launcher arguments, shell-quoted (repeatable), e.g. '--max-batch-size 16'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = run_quality(args.model, [f.strip() for f in args.formats.split(",") if f.strip()], args.prompts,
                       args.tokens, [a for arg in args.launcher_arg for a in shlex.split(arg)])
    print(f"{args.prompts} prompts x {args.tokens} greedy tokens; perplexity over {DATA / 'quality_text.txt'}")
    print(quality_table(rows))


if __name__ == "__main__":
    main()
