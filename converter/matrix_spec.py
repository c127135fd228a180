"""The matrix file (``mtconvert matrix ZOO.toml``): models, targets, precisions and run options,
read into plain cell specs that a worker process (local or Ray) turns into ConvertOptions.

    targets = ["onnx-mobile", "tflite"]      # every model's, unless the model says
    precisions = ["fp32", "int8"]

    [options]                                # run options for every cell: any key of the
    iterations = 5                           # option spec (converter/optspec.py), backend
    warmup = 1                               # options included

    [models.bert]                            # one table per model; the name is the cell's
    path = "zoo/bert/bert.ts17.onnx"         # relative paths: from the matrix file's folder
    inputs = "zoo/bert/inputs.npz"
    task = "text-encoder"                    # free text, shown in the reports
    precisions = ["fp32"]                    # this model's own (also ``targets``)
    input_shapes = { input_ids = "1x24" }    # any other key: a run option for its cells
    raw_sources = { pt2 = "zoo/bert/bert.pt2" }  # --raw: the same model in the other form a
                                             # raw toolchain takes (coremltools: a .pt2)

With ``--raw`` every fp32 cell of a target that has a raw toolchain (converter/raw.py) gets a
raw twin: the same model through that toolchain at its defaults, judged by the same validator.

Every cell's options are checked here with ``optspec.build``, so an unknown key or a bad value
is a one-line UsageError (exit 2) before any cell runs.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtconvert.errors import UsageError

if TYPE_CHECKING:
    from mtconvert.registry import Registry

TOP_KEYS = ("targets", "precisions", "options", "models")
MODEL_KEYS = ("path", "task", "targets", "precisions", "raw_sources")
# set by the matrix for each cell, never by the file
RESERVED = {"out_dir": "each cell writes under the matrix's --out",
            "precision": "use precisions = [...]"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class CellSpec:
    """One cell as plain data (picklable, JSON-able): what a worker needs to run it."""

    model: str
    target: str
    precision: str
    path: str
    task: str | None
    values: dict[str, Any] = field(default_factory=dict)  # option spec values, paths absolute
    raw: str | None = None  # a raw toolchain's name (converter/raw.py); None: mtconvert's cell
    sources: dict[str, str] = field(default_factory=dict)  # --raw: {"onnx"|"pt2": path}

    @property
    def id(self) -> str:
        return f"{self.model}/{self.target}/{self.precision}" + (f"/raw-{self.raw}"
                                                                  if self.raw else "")

    @property
    def file_name(self) -> str:
        return f"{self.model}.{self.target}.{self.precision}" + (f".raw-{self.raw}"
                                                                  if self.raw else "") + ".json"

    def key(self) -> str:
        """Changes when anything that decides the cell's result changes (for --resume)."""
        p = Path(self.path)
        stat = (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
        parts = [self.model, self.target, self.precision, self.path, stat, self.values]
        if self.raw:  # mtconvert's cells keep the keys they had before --raw existed
            parts += [self.raw, self.sources]
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, "precision": self.precision,
                "path": self.path, "task": self.task, "values": self.values, "raw": self.raw,
                "sources": self.sources}


@dataclass(frozen=True)
class MatrixSpec:
    file: Path
    cells: tuple[CellSpec, ...]


def load(path: Path, out_dir: Path, registry: Registry | None = None,
         defaults: dict[str, Any] | None = None, raw: bool = False) -> MatrixSpec:
    """Read and check the matrix file; every cell's options are built once here. ``defaults``:
    run options beneath the file's ``[options]`` (a config file's, mtconvert.toml); ``raw``:
    add the raw-toolchain twins (--raw)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"matrix file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, path.resolve().parent, Path(out_dir), registry, str(path), defaults, raw)


def parse(data: dict[str, Any], base: Path, out_dir: Path, registry: Registry | None = None,
          where: str = "matrix", defaults: dict[str, Any] | None = None,
          raw: bool = False) -> MatrixSpec:
    from mtconvert.backends.base import PRECISIONS
    from mtconvert.registry import default_registry

    registry = registry or default_registry()
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; the top level takes "
                         f"{', '.join(TOP_KEYS)}")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise UsageError(f"{where}: no models; add a [models.NAME] table with a path")
    shared = dict(defaults or {}) | _table(data.get("options", {}), f"{where}: [options]")
    specs = _option_specs(registry)
    cells: list[CellSpec] = []
    for name, model in models.items():
        at = f"{where}: model {name!r}"
        if not _NAME.match(name):
            raise UsageError(f"{at}: a model name takes letters, digits, '.', '_' and '-'")
        model = _table(model, at)
        if "path" not in model:
            raise UsageError(f"{at}: no path")
        values = shared | {k: v for k, v in model.items() if k not in MODEL_KEYS}
        for key in values:
            if key in RESERVED:
                raise UsageError(f"{at}: {key} cannot be set per cell: {RESERVED[key]}")
            if key not in specs:
                raise UsageError(f"{at}: unknown option {key!r} (run options: "
                                 f"{', '.join(sorted(specs))})")
        values = {k: _absolute(specs[k].kind, v, base) for k, v in values.items()}
        targets = _names(model.get("targets", data.get("targets")), f"{at}: targets")
        precisions = _names(model.get("precisions", data.get("precisions", ["fp32"])),
                            f"{at}: precisions")
        for p in precisions:
            if p not in PRECISIONS:
                raise UsageError(f"{at}: unknown precision {p!r}; choose from "
                                 f"{', '.join(PRECISIONS)}")
        if not targets:
            raise UsageError(f"{at}: no targets (give targets = [...] at the top or per model)")
        src = Path(model["path"]) if Path(model["path"]).is_absolute() else base / model["path"]
        sources = _raw_sources(model.get("raw_sources", {}), src, base, at)
        task = model.get("task")
        for target in dict.fromkeys(registry.resolve(t) for t in targets):
            for precision in precisions:
                cell = CellSpec(name, target, precision, str(src),
                                None if task is None else str(task),
                                values | {"out_dir": str(out_dir / name / f"{target}-{precision}")})
                build_options(cell, registry)  # a bad value fails now, not in a worker
                cells.append(cell)
                if raw:
                    cells += _raw_twin(cell, sources, out_dir)
    return MatrixSpec(Path(where), tuple(cells))


def _raw_sources(value: Any, src: Path, base: Path, at: str) -> dict[str, str]:
    """The model in each form a raw toolchain takes: its own path fills its form's slot."""
    table = _table(value, f"{at}: raw_sources")
    bad = sorted(set(table) - {"onnx", "pt2"})
    if bad:
        raise UsageError(f"{at}: raw_sources takes onnx and pt2, not {', '.join(bad)}")
    found = {k: str(Path(v) if Path(v).is_absolute() else base / v) for k, v in table.items()}
    form = src.suffix.lower().lstrip(".")
    return found | ({form: str(src)} if form in ("onnx", "pt2") else {})


def _raw_twin(cell: CellSpec, sources: dict[str, str], out_dir: Path) -> list[CellSpec]:
    """The cell through its target's raw toolchain at its defaults (fp32 cells: the
    toolchains' defaults make no other precision)."""
    from mtconvert.raw import TOOLCHAINS

    tool = TOOLCHAINS.get(cell.target)
    if tool is None or cell.precision != "fp32":
        return []
    out = str(out_dir / cell.model / f"{cell.target}-{cell.precision}-raw-{tool}")
    return [replace(cell, raw=tool, sources=sources, values=cell.values | {"out_dir": out})]


def build_options(cell: CellSpec, registry: Registry | None = None) -> Any:
    """The cell's ConvertOptions (one target, one precision, one target job)."""
    from mtconvert import optspec

    values = {"jobs": 1} | cell.values | {"targets": [cell.target],
                                          "precision": cell.precision}
    try:
        return optspec.build("convert", values, registry)
    except TypeError as exc:  # an unknown name: checked above, but keep the one line
        raise UsageError(f"cell {cell.id}: {exc}") from None
    except UsageError as exc:
        raise UsageError(f"cell {cell.id}: {exc}") from None


def _option_specs(registry: Registry) -> dict[str, Any]:
    from mtconvert import optspec

    return {o.name: o for o in optspec.core("convert") + optspec.backend_options(registry,
                                                                                 "convert")}


def _table(value: Any, at: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{at}: expected a table")
    return dict(value)


def _names(value: Any, at: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{at}: expected a list of names")
    return value


def _absolute(kind: str, value: Any, base: Path) -> Any:
    if kind in ("path", "data") and isinstance(value, str) and not Path(value).is_absolute():
        return str(base / value)
    return value


def _cli_options() -> tuple[Any, ...]:
    from mtconvert.backends.options import Option

    return (
        Option("out_dir", "path", Path("build/matrix"), "Folder for the cells' artifacts "
               "(OUT/MODEL/TARGET-PRECISION/), their result files (OUT/cells/) and "
               "OUT/matrix.json.", flag="--out", show_default=True),
        Option("executor", "choice", "local", "Where cells run: a local process pool, or Ray "
               "tasks (pip install 'mtconvert[ray]').", choices=("local", "ray"),
               show_default=True),
        Option("jobs", "int", None, "Cells at once (default: cores, at most 4; with Ray: the "
               "cluster's CPUs / --cpus-per-cell).", short="-j"),
        Option("resume", "bool", False, "Keep the cells an earlier run of the same matrix "
               "finished (OUT/cells/), run the rest."),
        Option("cell_timeout", "float", None, "Seconds a cell may take before its processes are "
               "killed and it is an error (default: 4 x its --timeout + 120)."),
        Option("ray_address", "str", None, "Ray cluster to run on (e.g. auto or "
               "ray://HOST:10001); default: a local instance sized for --jobs."),
        Option("raw", "bool", False, "Also run each fp32 cell through its target's raw "
               "toolchain at its defaults (onnx2tf, pnnx, coremltools, the ORT-format tool), "
               "judged by the same validator; shown beside mtconvert's column, not gated."),
        Option("cpus_per_cell", "float", 1.0, "Ray: CPUs each cell's task reserves.",
               show_default=True),
        Option("memory_per_cell", "str", None, "Ray: memory each cell's task reserves, e.g. "
               "2GB or 512MB."),
    )


CLI_OPTIONS = _cli_options()


def parse_bytes(text: str | None) -> int | None:
    """``2GB``, ``512MB``, ``1.5G``, or a number of bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)i?B?\s*", str(text), re.I)
    if not m:
        raise UsageError(f"--memory-per-cell: not a size: {text!r} (e.g. 2GB, 512MB)")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)
