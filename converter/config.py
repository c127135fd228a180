"""Options from a file: ``mtconvert.toml``, or ``[tool.mtconvert]`` in pyproject.toml, in the
current folder (or ``--config PATH``). Keys are the option names of the spec (mtconvert.optspec:
``precision = "fp16"``, ``atol = 1e-3``, ``input_shapes = {input_ids = "1x128"}``); a table named
after a target holds that backend's own options (``[tool.mtconvert.tflite] allow_flex = true``).
Command-line options override the file. An unknown key is a one-line error (exit 2).
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from mtconvert.errors import UsageError

NAMES = ("mtconvert.toml", "pyproject.toml")


def find(folder: Path) -> Path | None:
    """The folder's mtconvert.toml, else its pyproject.toml if that has [tool.mtconvert]."""
    if (folder / NAMES[0]).is_file():
        return folder / NAMES[0]
    pyproject = folder / NAMES[1]
    if pyproject.is_file() and "mtconvert" in _read(pyproject).get("tool", {}):
        return pyproject
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config {path}: {exc}") from None


def load(path: Path, mode: str, registry: Any) -> dict[str, Any]:
    """The options the file sets for ``mode``: {name: value}, backend options included."""
    from mtconvert import optspec, render

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    data = _read(path)
    if path.name == NAMES[1]:
        data = data.get("tool", {}).get("mtconvert", {})
    core = {o.name: o for o in (*optspec.CORE, *render.options(mode))}
    backend = {o.name: o for o in optspec.backend_options(registry, mode)}
    targets = set(registry.names())
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if key in targets and isinstance(value, dict):
            values |= _target_table(path, key, value, registry)
        elif name in core or name in backend:
            opt = core.get(name) or backend[name]
            if mode in opt.modes:  # options of other modes (out_dir for validate) are ignored
                values[name] = value
        else:
            raise UsageError(f"config {path}: unknown key {key!r}; known: options "
                             f"{', '.join(sorted(set(core) | set(backend)))}, or a table per "
                             f"target ({', '.join(sorted(targets))})")
    return values


def _target_table(path: Path, target: str, table: dict[str, Any],
                  registry: Any) -> dict[str, Any]:
    own = {o.name for o in registry.get(target).options}
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in own:
            raise UsageError(f"config {path}: [{target}] has no option {key!r}; "
                             f"{target}'s options: {', '.join(sorted(own)) or 'none'}")
        out[name] = value
    return out
