"""`tgis-client`: a small command-line client for the fmaas gRPC API (any TGIS-compatible server)."""

from __future__ import annotations

import argparse
import sys

import grpc

from services.gateway.pb import generation_pb2 as pb
from services.gateway.pb import generation_pb2_grpc


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.address)
    with open(args.tls_ca, "rb") as ca:
        root = ca.read()
    key = cert = None
    if args.tls_cert:
        with open(args.tls_cert, "rb") as f:
            cert = f.read()
        with open(args.tls_key, "rb") as f:
            key = f.read()
    return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root, key, cert))


def _params(args: argparse.Namespace) -> pb.Parameters:
    params = pb.Parameters(
        method=pb.SAMPLE if args.sample else pb.GREEDY,
        stopping=pb.StoppingCriteria(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                     stop_sequences=args.stop or []),
    )
    _guide(params.decoding, args)
    if args.sample:
        params.sampling.temperature = args.temperature
        params.sampling.top_k = args.top_k
        params.sampling.top_p = args.top_p
        if args.seed is not None:
            params.sampling.seed = args.seed
    return params


def _guide(decoding: pb.DecodingParameters, args: argparse.Namespace) -> None:
    """Guided decoding (the vLLM TGIS adapter's extension): at most one constraint, files read here."""
    if args.json:
        decoding.format = pb.DecodingParameters.JSON
    elif args.json_schema:
        with open(args.json_schema, encoding="utf-8") as f:
            decoding.json_schema = f.read()
    elif args.regex is not None:
        decoding.regex = args.regex
    elif args.choice is not None:
        decoding.choice.choices.extend(args.choice.split(","))
    elif args.grammar:
        with open(args.grammar, encoding="utf-8") as f:
            decoding.grammar = f.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Talk to a TGIS-compatible gRPC server.")
    parser.add_argument("--address", default="localhost:8033", help="host:port of the gRPC server")
    parser.add_argument("--tls-ca", help="CA certificate to verify the server (enables TLS)")
    parser.add_argument("--tls-cert", help="client certificate (mTLS)")
    parser.add_argument("--tls-key", help="client key (mTLS)")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("texts", nargs="+")
    gen.add_argument("--stream", action="store_true", help="stream tokens as they come (one prompt)")
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.add_argument("--min-new-tokens", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    guide = gen.add_mutually_exclusive_group()
    guide.add_argument("--json", action="store_true", help="constrain the output to a JSON object")
    guide.add_argument("--json-schema", metavar="FILE", help="constrain the output to this JSON schema")
    guide.add_argument("--regex", metavar="R", help="constrain the output to this regular expression")
    guide.add_argument("--choice", metavar="A,B", help="the output is one of these comma-separated strings")
    guide.add_argument("--grammar", metavar="FILE", help="constrain the output to this EBNF grammar")
    gen.add_argument("--adapter-id", help="LoRA adapter to generate with (vLLM TGIS adapter extension)")
    tok = sub.add_parser("tokenize", help="count (and show) the tokens of texts")
    tok.add_argument("texts", nargs="+")
    sub.add_parser("model-info", help="show the served model's limits")
    args = parser.parse_args(argv)

    stub = generation_pb2_grpc.GenerationServiceStub(_channel(args))
    try:
        if args.command == "generate" and args.stream:
            request = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=args.texts[0]), params=_params(args),
                                                 adapter_id=args.adapter_id)
            for message in stub.GenerateStream(request):
                sys.stdout.write(message.text)
                sys.stdout.flush()
                if message.stop_reason:
                    print(f"\n[{pb.StopReason.Name(message.stop_reason)}, {message.generated_token_count} tokens]")
        elif args.command == "generate":
            request = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=t) for t in args.texts],
                                                  params=_params(args), adapter_id=args.adapter_id)
            for response in stub.Generate(request).responses:
                print(f"{response.text!r} [{pb.StopReason.Name(response.stop_reason)}, "
                      f"{response.generated_token_count} tokens, seed {response.seed}]")
        elif args.command == "tokenize":
            request = pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=t) for t in args.texts],
                                                return_tokens=True)
            for response in stub.Tokenize(request).responses:
                print(response.token_count, list(response.tokens))
        else:
            info = stub.ModelInfo(pb.ModelInfoRequest())
            print(f"{pb.ModelInfoResponse.ModelKind.Name(info.model_kind)} max_sequence_length="
                  f"{info.max_sequence_length} max_new_tokens={info.max_new_tokens}")
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
