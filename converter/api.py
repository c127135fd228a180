"""The Python API behind ``mtconvert.convert``: keyword options -> ConvertOptions -> pipeline."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mtconvert.errors import UsageError
from mtconvert.options import ConvertOptions
from mtconvert.report import Report
from mtconvert.shapes import parse_shape_spec
from mtconvert.validators.compare import KEYS, ToleranceOverrides

_SIMPLE = ("precision", "threads", "warmup", "iterations", "seed", "inputs", "extra", "jobs",
           "cache", "trust_pickle", "max_model_bytes", "seq_lens", "batch_sizes", "localize")


def convert(model: Any, targets: Any, out_dir: Any, example_inputs: Any, **options: Any) -> Report:
    from mtconvert import pipeline

    progress = options.pop("progress", None)
    registry = options.pop("registry", None)
    opts = build_options(targets, out_dir, **options)
    return pipeline.run(model, opts, example_inputs=example_inputs, registry=registry,
                        progress=progress)


def validate(source: Any, artifacts: list[Any], **options: Any) -> Report:
    from mtconvert.existing import run_validate

    progress = options.pop("progress", None)
    registry = options.pop("registry", None)
    opts = build_options(None, ".", **options)
    return run_validate(source, [Path(a) for a in artifacts], opts, registry=registry,
                        progress=progress)


def verify(bundle_dir: Any, **options: Any) -> Report:
    from mtconvert.bundle import run_verify

    progress = options.pop("progress", None)
    registry = options.pop("registry", None)
    opts = build_options(None, ".", **options)
    return run_verify(Path(bundle_dir), opts, registry=registry, progress=progress)


def build_options(targets: Any, out_dir: Any, **options: Any) -> ConvertOptions:
    known = set(_SIMPLE) | {"input_shapes", "atol", "rtol", "min_cosine", "min_snr_db",
                            "timeout", "calibration"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"convert() got unexpected option(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(known))}")
    kw = {k: options[k] for k in _SIMPLE if options.get(k) is not None}
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    if "timeout" in options:
        kw["timeout_s"] = options["timeout"]
    if options.get("calibration") is not None:
        kw["calibration"] = Path(options["calibration"])
    return ConvertOptions(targets=tuple(targets) if targets is not None else None,
                          out_dir=Path(out_dir), input_shapes=_shapes(options.get("input_shapes")),
                          tolerances=tolerances(**{k: options.get(k) for k in KEYS}), **kw)


def _shapes(shapes: dict[str, Any] | None) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, shape in (shapes or {}).items():
        if isinstance(shape, str):
            out[name] = parse_shape_spec(f"{name}={shape}")[1]
        elif all(isinstance(d, int) and d > 0 for d in shape):
            out[name] = tuple(shape)
        else:
            raise UsageError(f"input_shapes[{name!r}] must be positive ints or 'DxD', not {shape!r}")
    return out


def tolerances(atol: Any = None, rtol: Any = None, min_cosine: Any = None,
               min_snr_db: Any = None) -> ToleranceOverrides:
    glob: dict[str, float | None] = {}
    per: dict[str, dict[str, float]] = {}
    for key, value in (("atol", atol), ("rtol", rtol), ("min_cosine", min_cosine),
                       ("min_snr_db", min_snr_db)):
        if isinstance(value, dict):
            for out, v in value.items():
                per.setdefault(out, {})[key] = _positive(key, v)
        elif value is not None:
            glob[key] = _positive(key, value)
    return ToleranceOverrides(per_output=per or None, **glob)


def _positive(key: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key} must be a number, not {value!r}") from None
    if not v >= 0:
        raise UsageError(f"{key} must be >= 0, not {value!r}")
    return v
