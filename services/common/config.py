"""Service configs as frozen dataclasses whose fields are also CLI flags and env vars.

Each field declared with `knob()` becomes `--field-name` on the command line
and reads its default from the named environment variable (the TGIS name
where TGIS has one).  A bad value, from either place, is an error at start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    """Parse a boolean flag or env value; anything unexpected is an error, not False."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def knob(default: Any, env: str | None, help: str, *, flag: str | None = None, short: str | None = None) -> Any:
    """Declare a config field settable by `--flag` and by env var `env` (flag wins)."""
    return dataclasses.field(default=default, metadata={"env": env, "help": help, "flag": flag, "short": short})


def _base_type(hint: Any) -> type:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _converter(kind: type):
    if kind is bool:
        return parse_bool
    return kind


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per knob of the dataclass `cls` to `parser`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "env" not in f.metadata:
            continue
        kind = _base_type(hints[f.name])
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        names = [flag] + ([f.metadata["short"]] if f.metadata["short"] else [])
        env = f.metadata["env"]
        env_note = f" [env {env}]" if env else ""
        extra: dict[str, Any] = {"nargs": "?", "const": True} if kind is bool else {}
        parser.add_argument(
            *names, dest=f.name, type=_converter(kind), default=None,
            help=f"{f.metadata['help']} (default: {f.default}){env_note}", **extra,
        )


def config_from_namespace(cls: type[T], namespace: argparse.Namespace, environ: typing.Mapping[str, str] | None = None) -> T:
    """Build `cls` from parsed flags, falling back to env vars, then to the field defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "env" not in f.metadata:
            continue
        value = getattr(namespace, f.name, None)
        env = f.metadata["env"]
        if value is None and env and environ.get(env, "") != "":
            try:
                value = _converter(_base_type(hints[f.name]))(environ[env])
            except ValueError as exc:
                raise SystemExit(f"invalid value for {env}: {exc}") from exc
        if value is not None:
            values[f.name] = value
    return cls(**values)


def parse_config(cls: type[T], argv: list[str] | None, description: str) -> T:
    """Parse a service's command line (and env) into its config dataclass."""
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser, cls)
    return config_from_namespace(cls, parser.parse_args(argv))
