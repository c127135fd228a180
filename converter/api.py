"""The Python API behind ``mtconvert.convert`` / ``validate`` / ``verify``: keyword options are
checked against the option spec (mtconvert.optspec) and handed to the run modes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mtconvert import optspec
from mtconvert.report import Report


def _split(options: dict[str, Any]) -> tuple[Any, Any, dict[str, Any] | None]:
    return options.pop("progress", None), options.pop("registry", None), options.pop("extra", None)


def convert(model: Any, targets: Any, out_dir: Any, example_inputs: Any, **options: Any) -> Report:
    from mtconvert.run import convert as mode

    progress, registry, extra = _split(options)
    opts = optspec.build("convert", {"targets": targets, "out_dir": out_dir, **options},
                         registry, extra)
    return mode.run(model, opts, example_inputs=example_inputs, registry=registry,
                    progress=progress)


def validate(source: Any, artifacts: list[Any] | tuple[Any, ...] = (),
             **options: Any) -> Report:
    from mtconvert.run import validate as mode

    progress, registry, extra = _split(options)
    opts = optspec.build("validate", options, registry, extra)
    return mode.run(source, [Path(a) for a in artifacts], opts, registry=registry,
                    progress=progress)


def verify(bundle_dir: Any, **options: Any) -> Report:
    from mtconvert.run import verify as mode

    progress, registry, extra = _split(options)
    opts = optspec.build("verify", options, registry, extra)
    return mode.run(Path(bundle_dir), opts, registry=registry, progress=progress)


def matrix(spec: Any, out_dir: Any = "build/matrix", **options: Any) -> Any:
    """``mtconvert matrix`` from Python: ``spec`` a matrix file's path, its parsed TOML (a dict,
    relative paths from the current folder) or a ``matrix_spec.MatrixSpec``."""
    from mtconvert import matrix_spec
    from mtconvert.errors import UsageError
    from mtconvert.run import matrix as mode

    progress, registry, extra = _split(options)
    options |= extra or {}  # backend options are run options of the matrix file too
    raw = bool(options.pop("raw", False))
    out = Path(out_dir).resolve()
    known = set(mode.MatrixOptions.__dataclass_fields__) - {"out_dir"}
    mvalues = {k: options.pop(k) for k in list(options) if k in known}
    if isinstance(mvalues.get("memory_per_cell"), str):
        mvalues["memory_per_cell"] = matrix_spec.parse_bytes(mvalues["memory_per_cell"])
    mopts = mode.MatrixOptions(out_dir=out, **mvalues)
    if isinstance(spec, matrix_spec.MatrixSpec):
        if options or raw:
            raise UsageError("run options and raw go in the matrix file when a MatrixSpec is "
                             f"given (got {', '.join(sorted(options)) or 'raw'})")
    elif isinstance(spec, dict):
        spec = matrix_spec.parse(spec, Path.cwd(), out, registry, "matrix", options, raw)
    else:  # the keyword run options sit beneath the file's [options]
        spec = matrix_spec.load(Path(spec), out, registry, options, raw)
    return mode.run(spec, mopts, registry=registry, progress=progress)
