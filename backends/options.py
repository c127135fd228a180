"""Declaring an option once: the CLI flag, the Python API keyword and the config-file key are all
generated from one ``Option``. The run's own options (converter/optspec.py) and each backend's
(``Backend.options``) use this one type, so a backend can declare its own without the framework
knowing it, and the CLI can show it.

Values are checked and converted by ``Option.parse`` wherever they come from (a CLI string, a
Python value, a TOML value); a bad one is a UsageError naming the option.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtconvert.errors import UsageError

MODES = ("convert", "validate", "verify")
KINDS = ("str", "int", "float", "bool", "path", "data", "choice", "list", "ints", "tolerance",
         "shape")


@dataclass(frozen=True)
class Option:
    """One option. ``name`` is the API keyword and config key (and, for a backend option, the
    ``TargetOptions.extra`` key); the CLI flag is ``--name-with-dashes`` unless ``flag`` says.

    Kinds: str, int, float, bool (a CLI switch), path, data (a path, or a mapping through the
    API), choice (one of ``choices``), list (names, comma-separated and/or repeated), ints (a
    comma-separated list: ``8,64``), tolerance (``VALUE`` or ``OUTPUT:VALUE``, repeatable: a
    float or {output: float}), shape (``NAME=1x128``, repeatable: {name: dims})."""

    name: str
    kind: str = "str"
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] = ()
    modes: tuple[str, ...] = ("convert",)
    metavar: str | None = None
    flag: str | None = None
    short: str | None = None  # e.g. "-j"
    show_default: bool = False
    backend: str | None = None  # set for a backend's own option: its target name

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: unknown kind {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"option {self.name}: a choice needs choices")
        if unknown := set(self.modes) - set(MODES):
            raise ValueError(f"option {self.name}: unknown modes {sorted(unknown)}")

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def repeatable(self) -> bool:
        return self.kind in ("tolerance", "shape", "list")

    def parse(self, value: Any) -> Any:
        """The value as the run uses it; None stays None (not given)."""
        if value is None:
            return None
        try:
            return _PARSERS[self.kind](self, value)
        except UsageError:
            raise
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{self.cli_flag}: {exc}") from None


def _data(_opt: Option, value: Any) -> Any:
    """A file path, or the data itself (a mapping of arrays, through the API)."""
    return value if isinstance(value, dict) else Path(value)


def _choice(opt: Option, value: Any) -> Any:
    for c in opt.choices:  # a CLI string "4" is the choice 4
        if value == c or str(value) == str(c):
            return c
    raise UsageError(f"{opt.cli_flag} must be one of {', '.join(map(str, opt.choices))}, "
                     f"not {value!r}")


def _bool(opt: Option, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise UsageError(f"{opt.cli_flag} takes true or false, not {value!r}")


def _list(_opt: Option, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value)
    return tuple(t.strip() for v in items for t in str(v).split(",") if t.strip())


def _ints(opt: Option, value: Any) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(int(v) for v in items if str(v).strip())
    except ValueError:
        raise UsageError(f"{opt.cli_flag} takes comma-separated integers, not {value!r}") from None


def _number(text: Any, opt: Option) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{opt.cli_flag} {text!r} is not a number") from None
    if not v >= 0:
        raise UsageError(f"{opt.cli_flag} must be >= 0, not {text!r}")
    return v


def _tolerance(opt: Option, value: Any) -> float | dict[str, float]:
    """A number; {output: number}; or CLI strings ``VALUE`` / ``OUTPUT:VALUE`` (repeated)."""
    if isinstance(value, dict):
        return {str(k): _number(v, opt) for k, v in value.items()}
    if isinstance(value, (int, float)):
        return _number(value, opt)
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        return None  # type: ignore[return-value]
    glob, per = None, {}
    for item in items:
        out, sep, num = str(item).rpartition(":")
        if sep:
            per[out] = _number(num, opt)
        else:
            glob = _number(num, opt)
    if per and glob is not None:
        raise UsageError(f"{opt.cli_flag}: give either one global value or OUTPUT:VALUE pairs, "
                         "not both")
    return per or glob  # type: ignore[return-value]


_SPEC = re.compile(r"^(?P<name>[^=\s]+)=(?P<dims>\d+(?:[x,]\d+)*)$")


def parse_shape_spec(text: str) -> tuple[str, tuple[int, ...]]:
    """``input_ids=1x128`` -> ("input_ids", (1, 128))."""
    m = _SPEC.match(text.strip())
    if not m:
        raise UsageError(f"malformed --input-shape {text!r}: expected NAME=DIMxDIM..., "
                         "e.g. input_ids=1x128")
    dims = tuple(int(d) for d in re.split(r"[x,]", m["dims"]))
    if any(d <= 0 for d in dims):
        raise UsageError(f"malformed --input-shape {text!r}: dimensions must be positive")
    return m["name"], dims


def _shape(opt: Option, value: Any) -> dict[str, tuple[int, ...]]:
    """{name: dims or 'DxD'}, or CLI strings ``NAME=1x128`` (repeated)."""
    if isinstance(value, dict):
        out = {}
        for name, dims in value.items():
            if isinstance(dims, str):
                out[name] = parse_shape_spec(f"{name}={dims}")[1]
            elif all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
                out[name] = tuple(dims)
            else:
                raise UsageError(f"input_shapes[{name!r}] must be positive ints or 'DxD', "
                                 f"not {dims!r}")
        return out
    items = [value] if isinstance(value, str) else list(value)
    return dict(parse_shape_spec(str(spec)) for spec in items)


def _typed(kind: type) -> Any:
    def parse(opt: Option, value: Any) -> Any:
        if isinstance(value, bool) or (kind is not str and isinstance(value, str)
                                       and not value.strip()):
            raise UsageError(f"{opt.cli_flag} takes a {kind.__name__}, not {value!r}")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise UsageError(f"{opt.cli_flag} takes a {kind.__name__}, not {value!r}") from None
    return parse


_PARSERS = {"str": _typed(str), "int": _typed(int), "float": _typed(float), "bool": _bool,
            "path": lambda _o, v: Path(v), "data": _data, "choice": _choice, "list": _list, "ints": _ints,
            "tolerance": _tolerance, "shape": _shape}
