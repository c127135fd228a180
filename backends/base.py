"""The backend plugin contract, and the shared work every backend needs (tool runs, file checks).

A backend turns a PreparedSource into an Artifact (``convert``), says what is not mobile-ready in
it (``lint``) and opens a Session that runs it (``open``). The framework does timing, input
checks, comparison and reporting; the plugin fills these small hooks only.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mtconvert import deps
from mtconvert.errors import ConversionError, ModelLoadError, UsageError

if TYPE_CHECKING:
    import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: shape entries are ints, or a str naming a dynamic axis (None if unnamed)."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str  # numpy dtype name: "float32", "int64", ...

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass
class PreparedSource:
    """The source model, described and ready for the backends.

    ``onnx_path`` always exists (torch sources are exported to ONNX once, with the validation
    shapes). ``torch_module`` is set for torch sources only; backends with a PyTorch route use it.
    ``input_shapes`` holds the concrete shape chosen for every input (dynamic axes fixed).
    """

    format: str  # "onnx" | "torch"
    name: str  # file stem used for artifacts
    onnx_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    input_shapes: dict[str, tuple[int, ...]]
    work_dir: Path
    path: Path | None = None
    torch_module: Any = None


@dataclass(frozen=True)
class TargetOptions:
    precision: str = "fp32"
    threads: int = 1
    timeout_s: float | None = None
    calibration: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    route: str = ""  # which of the backend's routes() to take


@dataclass(frozen=True)
class Finding:
    """A mobile-compatibility finding. ``error`` fails the target; the others are information."""

    severity: str  # "error" | "warning" | "info"
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Artifact:
    """What a backend produced. ``primary`` is the file the runtime loads; ``files`` all that ship.

    ``meta`` is JSON-serialisable backend data the session needs (name maps, fixed shapes...).
    """

    target: str
    primary: Path
    files: tuple[Path, ...]
    precision: str = "fp32"
    steps: tuple[str, ...] = ()
    tool_versions: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def relocated(self, old_dir: Path, new_dir: Path) -> Artifact:
        def move(p: Path | None) -> Path | None:
            return None if p is None else new_dir / p.relative_to(old_dir)

        return replace(self, primary=move(self.primary), files=tuple(move(p) for p in self.files),
                       log_path=move(self.log_path))

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "primary": str(self.primary),
                "files": [str(p) for p in self.files], "precision": self.precision,
                "steps": list(self.steps), "tool_versions": dict(self.tool_versions),
                "log_path": str(self.log_path) if self.log_path else None, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        return cls(target=d["target"], primary=Path(d["primary"]),
                   files=tuple(Path(p) for p in d["files"]), precision=d["precision"],
                   steps=tuple(d["steps"]), tool_versions=dict(d["tool_versions"]),
                   log_path=Path(d["log_path"]) if d.get("log_path") else None, meta=d["meta"])


@dataclass(frozen=True)
class Availability:
    can_convert: bool
    can_run: bool
    missing: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    install_hint: str | None = None
    reason: str | None = None


class Session(ABC):
    """An opened artifact. ``run`` returns outputs keyed by the SOURCE's output names, in the
    source's layout and dtype family."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
        """Every floating-point tensor the runtime computes for ``feeds``, in execution order,
        as (tensor name, op type, value) in the runtime's own names and layout (first localization
        and the first non-finite op). Only where ``Backend.addressable_intermediates``; a runtime
        that runs one item at a time (ncnn) may compute batch item 0 only."""
        raise NotImplementedError(f"{type(self).__name__} cannot address intermediate tensors")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime's resources."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(ABC):
    """One target. Class attributes are read without converting anything; heavy imports happen
    inside methods only."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str] = ""
    description: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    # import name -> distribution name, needed to convert / to run artifacts here
    convert_requires: ClassVar[dict[str, str]] = {}
    run_requires: ClassVar[dict[str, str]] = {}
    artifact_suffixes: ClassVar[tuple[str, ...]] = ()  # files `mtconvert validate` maps here
    fixed_shapes: ClassVar[bool] = False  # artifacts run only at the shapes they were made for
    addressable_intermediates: ClassVar[bool] = False  # its Session implements intermediates()

    @classmethod
    def availability(cls) -> Availability:
        """find_spec and metadata only: never imports the tools."""
        miss_conv = deps.missing_modules(cls.convert_requires)
        miss_run = deps.missing_modules(cls.run_requires)
        missing = tuple(sorted(set(miss_conv) | set(miss_run)))
        dists = sorted(set(cls.convert_requires.values()) | set(cls.run_requires.values()))
        hint = f"pip install 'mtconvert[{cls.extra}]'" if missing and cls.extra else None
        return Availability(can_convert=not miss_conv, can_run=not miss_run, missing=missing,
                            versions=deps.versions(dists), install_hint=hint,
                            reason=f"missing {', '.join(missing)}" if missing else None)

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise UsageError(f"target {self.name!r} supports precision "
                             f"{', '.join(self.precisions)}, not {precision!r}")

    @abstractmethod
    def convert(self, source: PreparedSource, out_dir: Path, opts: TargetOptions) -> Artifact: ...

    @abstractmethod
    def open(self, artifact: Artifact, threads: int) -> Session: ...

    def lint(self, artifact: Artifact) -> list[Finding]:
        return []

    def routes(self, source: PreparedSource) -> list[str]:
        """Alternative ways to convert ``source``, best first. The pipeline converts and
        validates each in turn and keeps the first whose artifact passes; one route (the
        default) means no alternatives."""
        return [""]

    def adopt(self, path: Path, source: PreparedSource, opts: TargetOptions) -> Artifact:
        """Describe an artifact built elsewhere so it can be linted and run. Fixed-shape
        targets put their input shapes in ``meta["input_shapes"]`` ({name: [dims]})."""
        raise UsageError(f"target {self.name!r} cannot validate existing artifacts")


# ---------------------------------------------------------------------------------------------
# Shared work for backends: running third-party tools as untrusted neighbours.

def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit|Failure))\b:?\s*(.*)$")
_GENERIC = ("Exception encountered when calling layer", "in user code:")


def error_summary(output: str, limit: int = 300) -> str:
    """The most telling line of a tool's output: the last ``SomethingError: message`` (with the
    next detail line when the message is generic), else the last non-empty line."""
    lines = [ln.strip() for ln in output.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        m = _ERROR_LINE.match(lines[i])
        if not m or lines[i].startswith(("File ", "raise ")):
            continue
        text = f"{m.group(1)}: {m.group(2)}".strip()
        if any(g in m.group(2) for g in _GENERIC) or not m.group(2):
            detail = next((ln for ln in lines[i + 1:] if ln), "")
            text = f"{text} {detail}".strip()
        return text[:limit]
    rest = [ln for ln in lines if ln]
    return rest[-1][:limit] if rest else ""


def run_tool(cmd: list[str], *, target: str, step: str, log_path: Path,
             timeout_s: float | None = None, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> str:
    """Run a converter in a child process, log its output to ``log_path``, return that output.

    A non-zero exit, a signal or a time-out raises ConversionError naming the step and the log.
    Callers must still check the files they expect: exit 0 proves nothing.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=child_env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = _decode(exc.stdout) + _decode(exc.stderr)
        _append_log(log_path, cmd, out)
        raise ConversionError(f"timed out after {timeout_s:g} s", target=target, step=step,
                              log_path=log_path, stderr_tail=tail(out)) from None
    out = proc.stdout + proc.stderr
    _append_log(log_path, cmd, out)
    if proc.returncode != 0:
        why = (f"killed by {_signal_name(proc.returncode)}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        last = error_summary(out)
        raise ConversionError(f"{why}: {last}" if last else why, target=target, step=step,
                              log_path=log_path, stderr_tail=tail(out))
    return out


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def _append_log(log_path: Path, cmd: list[str], output: str) -> None:
    with log_path.open("a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{output}\n")


def import_path(cls: type) -> str:
    """``module:QualName`` of a class: how the worker and the registry name a backend."""
    return f"{cls.__module__}:{cls.__qualname__}"


def match_names(names: list[str], source_names: list[str], what: str, kind: str) -> list[str]:
    """The source name of each of an adopted artifact's ``names`` (inputs or outputs): the
    names themselves when they are the source's, else the source's in order."""
    if len(names) != len(source_names):
        raise ModelLoadError(f"the {kind} has {len(names)} {what}s, the source "
                             f"{len(source_names)}")
    return list(names) if set(names) == set(source_names) else list(source_names)


def format_shapes(shapes: dict[str, Any]) -> str:
    """``input_ids=1x32, attention_mask=1x32``."""
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())


RESULT_PREFIX = "MTCONVERT-RESULT "


def tool_result(output: str, *, target: str, step: str, log_path: Path | None) -> dict[str, Any]:
    """The JSON a child tool printed on its last ``MTCONVERT-RESULT {json}`` line."""
    import json

    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise ConversionError("converter printed no result", target=target, step=step,
                          log_path=log_path)


def run_job(module: str, job: dict[str, Any], job_path: Path, *, target: str, step: str,
            log_path: Path, timeout_s: float | None,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``job`` as JSON, run ``python -m module JOB`` as an untrusted tool and return the
    result it printed."""
    import json

    job_path.write_text(json.dumps(job))
    out = run_tool(python_cmd("-m", module, str(job_path)), target=target, step=step,
                   log_path=log_path, timeout_s=timeout_s, env=env)
    return tool_result(out, target=target, step=step, log_path=log_path)


def python_cmd(*args: str) -> list[str]:
    """A command line that runs this interpreter (the tools are installed beside mtconvert)."""
    return [sys.executable, *args]


def expect_files(paths: list[Path], *, target: str, step: str, log_path: Path | None) -> None:
    """A tool that exits 0 without its output files has failed."""
    missing = [p.name for p in paths if not p.is_file() or p.stat().st_size == 0]
    if missing:
        raise ConversionError(f"tool exited 0 but did not write {', '.join(missing)}",
                              target=target, step=step, log_path=log_path)
