"""The backend plugin contract.

A backend turns a PreparedSource into an Artifact (``convert``), says what is not mobile-ready in
it (``lint``) and opens a Session that runs it (``open``). The framework does timing, input
checks, comparison and reporting; the plugin fills these small hooks only. Everything a backend
hands the framework is a declared, typed field here; running third-party tools is
mtconvert.backends.process, declaring backend options mtconvert.backends.options.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mtconvert import deps
from mtconvert.backends.options import Option
from mtconvert.errors import ModelLoadError, UsageError

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
    # the ONNX graph's quantization as described when it was loaded ({} for a float graph);
    # None when not described (then whoever needs it reads the graph)
    quantization: dict[str, Any] | None = None
    # a decode step's variant that keeps its KV cache in its own buffers, written in place
    # (mtconvert.generation.stateful; buffers named like the step's cache inputs), for a
    # target whose runtime holds state (Core ML iOS18+); None for every other source
    stateful_module: Any = None


@dataclass(frozen=True)
class TargetOptions:
    precision: str = "fp32"
    threads: int = 1
    timeout_s: float | None = None
    calibration: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    route: str = ""  # which of the backend's routes() to take
    # int8: the source's ONNX node names to keep in float (the float fallback, mtconvert.run.
    # fallback); honoured where Backend.keeps_float says so, each kept node in Artifact.steps
    keep_float: tuple[str, ...] = ()
    # a folder the backend may keep derived files in across runs (content-keyed); None when the
    # run keeps no cache (--no-cache): then nothing is kept
    cache_dir: Path | None = None
    # --sparse: store a pruned source's zero weights sparsely where the target can
    # (Backend.sparse_weights says how, Backend.no_sparse_weights why not)
    sparse: bool = False


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

    Fields the framework reads: ``fp32_twin`` (a reduced-precision artifact's exact fp32 sibling,
    made the same way, with all its files: the yardstick of what the precision costs),
    ``tolerance_profile`` (the profile to judge it by, when not its precision's: palettized
    weights are judged like int8), ``input_shapes`` (the shapes a fixed-shape artifact was made
    for: {input name: dims}). ``meta`` is the backend's own JSON-serialisable data for its
    session (name maps, modes); the framework stores and passes it, never reads it.
    """

    target: str
    primary: Path
    files: tuple[Path, ...]
    precision: str = "fp32"
    steps: tuple[str, ...] = ()
    tool_versions: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    fp32_twin: Artifact | None = None
    tolerance_profile: str | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def profile(self) -> str:
        """The tolerance profile the artifact is judged by."""
        return self.tolerance_profile or self.precision

    def relocated(self, old_dir: Path, new_dir: Path) -> Artifact:
        def move(p: Path | None) -> Path | None:
            return None if p is None else new_dir / p.relative_to(old_dir)

        return replace(self, primary=move(self.primary), files=tuple(move(p) for p in self.files),
                       log_path=move(self.log_path))

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "primary": str(self.primary),
                "files": [str(p) for p in self.files], "precision": self.precision,
                "steps": list(self.steps), "tool_versions": dict(self.tool_versions),
                "log_path": str(self.log_path) if self.log_path else None, "meta": self.meta,
                "fp32_twin": self.fp32_twin.to_dict() if self.fp32_twin else None,
                "tolerance_profile": self.tolerance_profile,
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        twin = d.get("fp32_twin")
        return cls(target=d["target"], primary=Path(d["primary"]),
                   files=tuple(Path(p) for p in d["files"]), precision=d["precision"],
                   steps=tuple(d["steps"]), tool_versions=dict(d["tool_versions"]),
                   log_path=Path(d["log_path"]) if d.get("log_path") else None, meta=d["meta"],
                   fp32_twin=cls.from_dict(twin) if twin else None,
                   tolerance_profile=d.get("tolerance_profile"),
                   input_shapes={k: tuple(v) for k, v in (d.get("input_shapes") or {}).items()})


@dataclass(frozen=True)
class OpTime:
    """One operator's share of an inference, from the runtime's own profiler: ``ms`` is its
    median time per inference over the profiled runs, ``name`` the runtime's node/layer name."""

    name: str
    op_type: str
    ms: float


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
    runtime: str = ""  # what computed the outputs, for the report ("" = the backend's name)
    # why timing this session says nothing about a device (then no latency is measured)
    latency_unavailable: str | None = None
    # what the runtime keeps from run to run (Core ML state: a KV cache in the model), by name:
    # a feed of that name overwrites it before the run; without one, a run reads what the last
    # run left. Empty for a stateless session
    states: tuple[TensorSpec, ...] = ()

    def reset_states(self) -> None:  # noqa: B027 - optional hook
        """Every state back to zeros (a new sequence)."""

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
        """Every floating-point tensor the runtime computes for ``feeds``, in execution order,
        as (tensor name, op type, value) in the runtime's own names and layout (first localization
        and the first non-finite op). Only where ``Backend.addressable_intermediates``; a runtime
        that runs one item at a time (ncnn) may compute batch item 0 only."""
        raise NotImplementedError(f"{type(self).__name__} cannot address intermediate tensors")

    def profile(self, feeds: dict[str, np.ndarray], runs: int) -> list[OpTime] | None:
        """Each operator's median time over ``runs`` inferences of ``feeds``, from the runtime's
        own profiler (``--profile``); None when this runtime has none here, and then
        ``profile_unavailable`` says why."""
        return None

    profile_unavailable: str = "this runtime has no per-operator profiler here"

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
    sidecar_suffixes: ClassVar[tuple[str, ...]] = ()  # files that ship beside an artifact
    fixed_shapes: ClassVar[bool] = False  # artifacts run only at the shapes they were made for
    addressable_intermediates: ClassVar[bool] = False  # its Session implements intermediates()
    # int8 artifacts can keep named source nodes in float (TargetOptions.keep_float)
    keep_float_layers: ClassVar[bool] = False
    # --sparse (TargetOptions.sparse): how this target stores a pruned source's zeros sparsely
    # ("" when it cannot), else why it cannot; the report says which (mtconvert.sparsity)
    sparse_weights: ClassVar[str] = ""
    no_sparse_weights: ClassVar[str] = "this target has no sparse weight storage"
    # the backend's own options (TargetOptions.extra keys), shown by the CLI, API and config
    options: ClassVar[tuple[Option, ...]] = ()

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

    def runs_other_shapes(self, artifact: Artifact) -> bool:
        """Whether ``artifact`` runs at shapes other than the ones it was made for (the sweep
        validates it there). Default: unless the backend is fixed-shape; a fixed-shape backend
        may say so of one artifact (an executorch .pte exported with torch.export Dims)."""
        return not type(self).fixed_shapes

    def keeps_float(self, opts: TargetOptions) -> bool:
        """Whether an artifact made with ``opts`` honours ``TargetOptions.keep_float``
        (int8 of a backend with ``keep_float_layers``; a backend may narrow it to a scheme)."""
        return type(self).keep_float_layers and opts.precision == "int8"

    def routes(self, source: PreparedSource) -> list[str]:
        """Alternative ways to convert ``source``, best first. The pipeline converts and
        validates each in turn and keeps the first whose artifact passes; one route (the
        default) means no alternatives."""
        return [""]

    def adopt(self, path: Path, source: PreparedSource, opts: TargetOptions) -> Artifact:
        """Describe an artifact built elsewhere so it can be linted and run. Fixed-shape
        targets set ``Artifact.input_shapes`` to the shapes it was made for."""
        raise UsageError(f"target {self.name!r} cannot validate existing artifacts")

    def snippets(self, artifact: Artifact, inputs: list[TensorSpec],
                 outputs: list[TensorSpec]) -> dict[str, str]:
        """Minimal code that loads ``artifact`` and runs it on its platform: {language: code}
        (languages in mtconvert.backends.snippets.LANGUAGES), with the artifact's real file
        name, tensor names, dtypes and shapes. ``inputs``/``outputs`` are the source's, at the
        shapes and dtypes the artifact was validated with. Default: none."""
        return {}


# Helpers on the contract's data.

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
