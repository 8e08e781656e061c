"""The app's pyproject.toml and `--run-config` text: read, parse and write them in one place.

The centralized baseline, the benchmark and the tests all need what `flwr run` would read:
the run-config defaults, a federation's options, and ``"k1=v1 k2='text'"`` override strings
(built as well as parsed: flwr refuses a key given twice, and 1.25's ``--federation-config``
replaces the whole options table, so callers restate every option). Flattening follows
Flower's own rule (``compat.flatten_dict``); values are TOML, as in Flower's parser, but a
malformed string is a one-line ``UsageError`` here instead of Flower's exit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli

from .compat import flatten_dict
from .errors import UsageError

_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")  # Flower's own key=value pattern


def read_pyproject(app: Path) -> dict[str, Any]:
    pyproject = Path(app) / "pyproject.toml"
    if not pyproject.is_file():
        raise UsageError(f"--app {str(app)!r}: no pyproject.toml at {pyproject.resolve()}; pass the app folder")
    try:
        with pyproject.open("rb") as handle:
            return tomli.load(handle)
    except tomli.TOMLDecodeError as err:
        raise UsageError(f"{pyproject}: not valid TOML ({err})") from None
    except OSError as err:
        raise UsageError(f"{pyproject} cannot be read ({err.strerror}); make it readable") from None


def app_run_config(app: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]``, flattened: the defaults a `flwr run` would use."""
    table = read_pyproject(app).get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if not isinstance(table, Mapping):
        raise UsageError(f"{Path(app) / 'pyproject.toml'} has no [tool.flwr.app.config] table; is it a Flower app?")
    return flatten_dict(dict(table))


def federation_options(app: Path, federation: str | None = None) -> dict[str, Any]:
    """A federation's ``options`` table, flattened (``backend.client-resources.num-cpus``: 1, ...)."""
    federations = read_pyproject(app)["tool"]["flwr"]["federations"]
    name = federation or federations["default"]
    return flatten_dict(dict(federations[name].get("options", {})))


def federation_override(app: Path, changes: Mapping[str, Any] | None = None, federation: str | None = None) -> str:
    """``--federation-config`` text: the federation's own options with ``changes`` applied.

    flwr 1.25 replaces the whole ``options`` table with an override's, so "options.num-supernodes=3"
    alone would drop client-resources and init-args; this restates every option. ``changes`` keys
    are option names without the ``options.`` prefix: ``{"num-supernodes": 3}``.
    """
    options = federation_options(app, federation)
    options.update(changes or {})
    return format_overrides({f"options.{key}": value for key, value in options.items()})


def parse_overrides(text: str, flag: str = "--run-config") -> dict[str, Any]:
    """``"k1=1 k2='text'"`` -> dict, with Flower's syntax (TOML values), or, as Flower also takes, the path
    of one ``.toml`` file of such keys; anything else is a UsageError."""
    if text.strip().endswith(".toml") and "=" not in text:
        return _overrides_file(Path(text.strip()).expanduser(), flag)
    leftover = _PAIR.sub("", text).strip()
    if leftover:
        raise UsageError(
            f"{flag} {text!r}: cannot read {leftover!r}; use space-separated key=value pairs, "
            f"strings in quotes, e.g. {flag} \"dataset='/path/to/cifar10' batch-size=64\""
        )
    values: dict[str, Any] = {}
    for key, value in _PAIR.findall(text):
        if key in values:
            raise UsageError(f"{flag} {text!r}: {key} is given twice; give each key once")
        try:
            values.update(tomli.loads(f'"{key}" = {value}'))
        except tomli.TOMLDecodeError:
            hint = f"; strings need quotes: {key}='{value}'" if not value.startswith(("'", '"')) else ""
            raise UsageError(f"{flag} {key}={value}: not a number, true/false or quoted string{hint}") from None
    return values


def _overrides_file(path: Path, flag: str) -> dict[str, Any]:
    """A TOML file of run-config keys (tables flattened with dots, as Flower does)."""
    try:
        with path.open("rb") as handle:
            return flatten_dict(tomli.load(handle))
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    except tomli.TOMLDecodeError as err:
        raise UsageError(f"{flag} {path}: not valid TOML ({err})") from None


def format_overrides(values: Mapping[str, Any]) -> str:
    """The inverse of ``parse_overrides``: one string for one ``--run-config`` flag."""

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            if "'" not in value:
                return f"'{value}'"  # a literal TOML string: backslashes stay as they are
            if '"' in value:  # Flower's pattern takes '...' or "..." with no quote of its kind inside
                raise UsageError(f"cannot pass {value!r} on the command line: it contains both kinds of quote")
            return '"' + value.replace("\\", "\\\\") + '"'  # a basic TOML string: backslashes escaped
        return repr(value)

    return " ".join(f"{key}={literal(value)}" for key, value in values.items())
