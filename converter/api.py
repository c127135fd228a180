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
