"""mtconvert: turn a (compressed) PyTorch or ONNX Transformer into mobile targets and prove each
artifact right: numerics against the source, mobile compatibility, latency, size, memory.

    import mtconvert
    report = mtconvert.convert("model.onnx", targets=["onnx-mobile"], out_dir="build")
    report.ok, report.targets["onnx-mobile"].numerics, report.to_json()

Importing this package is cheap: heavy modules load when a function needs them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mtconvert.version import __version__
__all__ = ["Report", "__version__", "convert", "validate", "verify", "matrix",
           "MatrixReport", "MtConvertError"]

if TYPE_CHECKING:
    from mtconvert.errors import MtConvertError
    from mtconvert.matrix_report import MatrixReport
    from mtconvert.report import Report


def convert(model: Any, targets: list[str] | tuple[str, ...] | str | None = None,
            out_dir: Any = "build", example_inputs: Any = None, **options: Any) -> Report:
    """Convert ``model`` to each target and validate every artifact against it.

    ``model``: a path to ``.onnx`` or ``.pt2`` (torch.export), or a ``torch.nn.Module`` with
    ``example_inputs``. ``targets``: names or aliases (None: every available target).
    Options: precision ("fp32" | "fp16" | "int8"), input_shapes ({name: (1, 128)} or
    {name: "1x128"}), inputs (.npz path or {name: array}), threads, warmup, iterations, seed,
    atol / rtol / min_cosine (a float, or {output: float}), timeout (seconds per step),
    calibration (.npz), extra ({backend option: value}, e.g. {"bundle": "golden/"} writes a
    golden bundle per target, {"coreml_target": "iOS17", "palettize": 4}), progress (callable
    taking a str).
    Returns a Report; a target that fails or errors is in the report, not raised.
    Raises MtConvertError subclasses for bad input (unreadable model, unknown target...).
    """
    from mtconvert.api import convert as _convert

    return _convert(model, targets, out_dir, example_inputs, **options)


def validate(source: Any, artifacts: list[Any] | tuple[Any, ...] = (),
             **options: Any) -> Report:
    """Check artifacts built elsewhere (.tflite, .ort, .onnx, .mlpackage) against ``source`` without
    converting. Same options (but targets/out_dir) and Report as ``convert``."""
    from mtconvert.api import validate as _validate

    return _validate(source, artifacts, **options)


def verify(bundle_dir: Any, **options: Any) -> Report:
    """Re-check the artifacts of golden bundles (``--bundle``) against the inputs, reference
    outputs and tolerances stored with them: no source model or converter needed."""
    from mtconvert.api import verify as _verify

    return _verify(bundle_dir, **options)


def matrix(spec: Any, out_dir: Any = "build/matrix", **options: Any) -> MatrixReport:
    """Run every model x target x precision cell of a matrix (``mtconvert matrix``) and return
    the MatrixReport (also written to OUT/matrix.json, one file per cell under OUT/cells/).

    ``spec``: a matrix file (TOML) path, its parsed TOML as a dict (relative paths from the
    current folder), or a ``mtconvert.matrix_spec.MatrixSpec``. Matrix options: executor
    ("local" | "ray"), jobs, resume, cell_timeout, ray_address, cpus_per_cell,
    memory_per_cell (bytes or "2GB"), raw (each fp32 cell also through its target's raw
    toolchain at its defaults, not gated), progress (callable taking a run.matrix.Event),
    registry. Any other keyword is a run option beneath the file's ``[options]`` (iterations,
    timeout, tolerances...). Cells that fail or error are in the report, not raised; a bad
    matrix file raises a UsageError. Each cell runs in a spawned process that re-imports the
    calling script: in a script, call this under ``if __name__ == "__main__":``.
    """
    from mtconvert.api import matrix as _matrix

    return _matrix(spec, out_dir, **options)


def __getattr__(name: str) -> Any:
    if name == "Report":
        from mtconvert.report import Report

        return Report
    if name == "MatrixReport":
        from mtconvert.matrix_report import MatrixReport

        return MatrixReport
    if name == "MtConvertError":
        from mtconvert.errors import MtConvertError

        return MtConvertError
    raise AttributeError(f"module 'mtconvert' has no attribute {name!r}")
