"""Raw-toolchain cells (``mtconvert matrix --raw``): the same model through each target's own
toolchain at its defaults, as a user would type it, the artifact then judged by mtconvert's
validator (``run.validate``, what ``mtconvert validate MODEL ARTIFACT`` runs), so a raw cell's
status and reason compare with mtconvert's cell beside it.

    tflite       onnx2tf -i MODEL.onnx -o OUT                       -> OUT/MODEL_float32.tflite
    ncnn         pnnx MODEL.onnx inputshape=[..]i64,..              -> MODEL.ncnn.param/.bin
    coreml       ct.convert(torch.export.load(MODEL.pt2)            -> MODEL.mlpackage
                            .run_decompositions({}))
    onnx-mobile  python -m onnxruntime.tools.convert_onnx_models_to_ort MODEL.onnx
                     --output_dir OUT                               -> OUT/MODEL.ort

pnnx gets ``inputshape`` (pnnx's documented usage: it fixes the shapes it traces) at the shapes
the validation feeds have. coremltools refuses a torch.export program in the TRAINING dialect
and its message says to run ``.run_decompositions({})`` first; that is done, nothing else.
Every tool runs as a child process with a time-out (``backends.process.run_tool``); its crash
or refusal is the raw cell's ``error`` with the tool's last error line.
"""
from __future__ import annotations

import json
import os
import shutil
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from mtconvert.backends.process import child_main, expect_files, python_cmd, run_tool
from mtconvert.errors import MtConvertError, StepError

# target -> its raw toolchain
TOOLCHAINS = {"tflite": "onnx2tf", "ncnn": "pnnx", "coreml": "coremltools",
              "onnx-mobile": "ort-format-tool"}
# the form of the model each toolchain takes
FORMS = {"onnx2tf": "onnx", "pnnx": "onnx", "coremltools": "pt2", "ort-format-tool": "onnx"}
_PNNX_TYPES = {"float32": "f32", "float16": "f16", "float64": "f64", "int64": "i64",
               "int32": "i32", "int8": "i8", "uint8": "u8"}


def run_cell(cell: Any, registry: Any = None) -> dict[str, Any]:
    """A raw cell (matrix_spec.CellSpec with ``raw``) in this process: its record, like
    ``run.matrix.run_cell``'s; a tool's crash or refusal is the cell's error, never raised."""
    from mtconvert.matrix_report import Cell

    t0 = time.monotonic()
    out = Path(cell.values["out_dir"])
    form = FORMS[cell.raw]
    model = cell.sources.get(form)
    base = dict(model=cell.model, target=cell.target, precision=cell.precision,
                source=cell.path, task=cell.task, raw=cell.raw)
    if model is None or not Path(model).is_file():
        why = (f"{cell.raw} takes a .{form}; model {cell.model!r} has none (give "
               f"raw_sources = {{ {form} = \"...\" }} in the matrix file)" if model is None
               else f"{cell.raw}: {Path(model).name} not found")
        return _record(cell, Cell(status="skipped", reason=why, **base))
    typed: list[str] = []  # the command, noted before it runs
    try:
        out.mkdir(parents=True, exist_ok=True)
        artifact = CONVERTERS[cell.raw](Path(model), out, _timeout(cell),
                                        lambda: _shapes(cell, registry), typed.append)
        report = _validate(cell, artifact, registry)
    except MtConvertError as exc:  # a StepError's reason starts with the tool (its step)
        why = exc.reason if isinstance(exc, StepError) else f"{cell.raw}: {exc}"
        return _record(cell, Cell(status="error", reason=why, error=str(exc),
                                  seconds=_since(t0), command=_last(typed), **base))
    except Exception as exc:  # a bug here: the cell's error, with what it was (as run_cell)
        why = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
        return _record(cell, Cell(status="error", reason=why, error=why, seconds=_since(t0),
                                  command=_last(typed), **base))
    target = next(iter(report.targets.values()))
    ref = report.reference
    done = Cell(status=target.status, reason=target.reason, report=target, seconds=_since(t0),
                reference_p50_ms=ref.latency.p50_ms if ref and ref.latency else None,
                command=_last(typed), **base)
    return _record(cell, done, report.to_dict())


# --- the toolchains, each at its defaults -------------------------------------------------------
def onnx2tf(onnx: Path, out: Path, timeout: float | None, _shapes: Any, note: Any) -> Path:
    """``onnx2tf -i MODEL.onnx -o OUT``: its float32 .tflite. onnx2tf rewrites its input file
    in place (shape inference and onnxsim save over ``-i``), so it gets a copy in OUT, never
    the user's model."""
    onnx = _copy_model(onnx, out)
    cmd = [_bin("onnx2tf"), "-i", str(onnx), "-o", str(out)]
    note(_typed(cmd))
    run_tool(cmd, target="tflite", step="onnx2tf", log_path=out / "raw.log", timeout_s=timeout,
             cwd=out)
    tflite = out / f"{onnx.stem}_float32.tflite"
    expect_files([tflite], target="tflite", step="onnx2tf", log_path=out / "raw.log")
    return tflite


def _copy_model(onnx: Path, out: Path) -> Path:
    """A private copy of the model (and its external data) in OUT for a tool that writes over
    its input."""
    out.mkdir(parents=True, exist_ok=True)
    for f in [onnx, *onnx.parent.glob(onnx.name + ".data")]:
        shutil.copyfile(f, out / f.name)
    return out / onnx.name


def pnnx(onnx: Path, out: Path, timeout: float | None, shapes: Any, note: Any) -> Path:
    """``pnnx MODEL.onnx inputshape=...`` in OUT (pnnx writes beside the model and in its
    working folder, so the model is linked there): its .ncnn.param (+ .bin)."""
    import pnnx as _pnnx_pkg

    local = out / onnx.name
    for f in [onnx, *onnx.parent.glob(onnx.name + ".data")]:  # external data travels along
        if not (out / f.name).exists():
            os.symlink(f.resolve(), out / f.name)
    spec = ",".join(f"[{','.join(map(str, shape))}]{_PNNX_TYPES.get(dtype, 'f32')}"
                    for shape, dtype in shapes())
    cmd = [str(Path(_pnnx_pkg.__file__).parent / "pnnx"), local.name, f"inputshape={spec}"]
    note(_typed(cmd))
    run_tool(cmd, target="ncnn", step="pnnx", log_path=out / "raw.log", timeout_s=timeout,
             cwd=out)
    param = out / f"{onnx.stem}.ncnn.param"
    expect_files([param, param.with_suffix(".bin")], target="ncnn", step="pnnx",
                 log_path=out / "raw.log")
    return param


def coremltools(pt2: Path, out: Path, timeout: float | None, _shapes: Any, note: Any) -> Path:
    """``ct.convert(torch.export.load(MODEL.pt2).run_decompositions({}))`` with every default
    (an ML Program, fp16 compute precision, iOS15), saved as MODEL.mlpackage."""
    package = out / f"{pt2.stem}.mlpackage"
    note(f"ct.convert(torch.export.load('{pt2.name}').run_decompositions({{}}))"
         f".save('{package.name}')")
    job = out / "raw-coremltools.job.json"
    job.write_text(json.dumps({"pt2": str(pt2), "out": str(package)}))
    run_tool(python_cmd("-m", "mtconvert.raw", str(job)), target="coreml", step="coremltools",
             log_path=out / "raw.log", timeout_s=timeout, cwd=out)
    if not package.is_dir():
        expect_files([package], target="coreml", step="coremltools", log_path=out / "raw.log")
    return package


def ort_format_tool(onnx: Path, out: Path, timeout: float | None, _shapes: Any,
                    note: Any) -> Path:
    """``python -m onnxruntime.tools.convert_onnx_models_to_ort MODEL.onnx --output_dir OUT``:
    its .ort (the required-operators config beside it)."""
    args = ["-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx), "--output_dir",
            str(out)]
    note(_typed(["python", *args]))
    run_tool(python_cmd(*args), target="onnx-mobile", step="convert_onnx_models_to_ort",
             log_path=out / "raw.log", timeout_s=timeout, cwd=out)
    ort = out / f"{onnx.stem}.ort"
    expect_files([ort], target="onnx-mobile", step="convert_onnx_models_to_ort",
                 log_path=out / "raw.log")
    return ort


CONVERTERS = {"onnx2tf": onnx2tf, "pnnx": pnnx, "coremltools": coremltools,
              "ort-format-tool": ort_format_tool}


# --- helpers --------------------------------------------------------------------------------
def _validate(cell: Any, artifact: Path, registry: Any) -> Any:
    """``mtconvert validate SOURCE ARTIFACT`` with the cell's run options."""
    from mtconvert.run import validate

    return validate.run(Path(cell.path), [artifact], _options(cell, registry),
                        registry=registry)


def _options(cell: Any, registry: Any) -> Any:
    """The cell's run options as ``mtconvert validate`` takes them."""
    from mtconvert import optspec

    names = {o.name for o in optspec.core("validate")}
    names |= {o.name for o in optspec.backend_options(registry or _registry(), "validate")}
    values = {k: v for k, v in cell.values.items() if k in names}
    return optspec.build("validate", values | {"precision": cell.precision}, registry)


def _shapes(cell: Any, registry: Any) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of each ONNX input, in order, as the validation will feed it: the
    cell's --inputs arrays, else its --input-shape and mtconvert's defaults for the rest."""
    from mtconvert.inputs import user_feeds
    from mtconvert.shapes import resolve_shapes
    from mtconvert.source import describe_onnx, read_onnx, weight_dims

    model = read_onnx(Path(cell.sources["onnx"]))
    specs, _ = describe_onnx(model)
    given = cell.values.get("inputs")
    if given:
        feeds = user_feeds(given)
        if all(s.name in feeds for s in specs):
            return [(tuple(feeds[s.name].shape), s.dtype) for s in specs]
    user = _options(cell, registry).input_shapes
    shapes, _ = resolve_shapes(specs, dict(user), weight_dims(model))
    return [(shapes[s.name], s.dtype) for s in specs]


def _registry() -> Any:
    from mtconvert.registry import default_registry

    return default_registry()


def _timeout(cell: Any) -> float | None:
    value = cell.values.get("timeout", 900.0)
    return None if value is None else float(value)


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else name


def _typed(cmd: list[str]) -> str:
    return " ".join(shlex.quote(Path(c).name if i == 0 else c) for i, c in enumerate(cmd))


def _last(noted: list[str]) -> str | None:
    return noted[-1] if noted else None


def _since(t0: float) -> float:
    return round(time.monotonic() - t0, 2)


def _record(cell: Any, done: Any, report: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"key": cell.key(), "cell": done.to_dict(), "report": report}


def _coremltools_child(job: dict[str, Any]) -> dict[str, Any]:
    """The coremltools child: the user's three lines, nothing more."""
    import coremltools as ct
    import torch

    program = torch.export.load(job["pt2"]).run_decompositions({})
    ct.convert(program).save(job["out"])
    return {"path": job["out"]}


if __name__ == "__main__":
    child_main(_coremltools_child)
