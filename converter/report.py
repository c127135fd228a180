"""The Report: what a run found, as frozen data. Renderers are functions of a Report alone.

JSON field names are a contract (schema_version 1): later versions add fields, never rename.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mtconvert.errors import EXIT_BACKEND, EXIT_CHECK_FAILED, EXIT_PASSED

SCHEMA_VERSION = 1
STATUSES = ("passed", "failed", "error", "skipped")


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    iterations: int
    warmup: int
    threads: int
    samples_ms: tuple[float, ...] = ()  # each timed run, in order (reports before: none)

    def __post_init__(self) -> None:  # a JSON list or a tuple: always a tuple of floats
        object.__setattr__(self, "samples_ms", tuple(float(x) for x in self.samples_ms))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Latency | None:
        return None if d is None else cls(**d)


@dataclass(frozen=True)
class ArtifactFile:
    path: str
    bytes: int
    # "artifact": the file the runtime loads (what `mtconvert validate` takes); "sidecar": a
    # file that ships beside it (ncnn's .bin, ORT's operator config); the log is TargetReport.log
    role: str = "artifact"


@dataclass(frozen=True)
class Conversion:
    seconds: float  # of the conversion itself, also when this run reused it from the cache
    steps: tuple[str, ...] = ()
    tool_versions: dict[str, str] = field(default_factory=dict)
    cached: bool = False  # True: reused from the conversion cache, not converted in this run

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Conversion | None:
        if d is None:
            return None
        return cls(d["seconds"], tuple(d.get("steps", ())), dict(d.get("tool_versions", {})),
                   bool(d.get("cached", False)))


@dataclass(frozen=True)
class Numerics:
    passed: bool
    runtime: str
    worst: dict[str, Any] | None  # {output, max_abs, cosine}
    outputs: dict[str, dict[str, Any]]  # name -> metrics, verdict and the tolerances used
    # reduced precisions: the same model's fp32 artifact, its error against the reference
    # ("fp32_worst") and this artifact's change against it per output ("vs_fp32")
    fp32_worst: dict[str, Any] | None = None
    vs_fp32: dict[str, dict[str, Any]] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Numerics | None:
        if d is None:
            return None
        return cls(d["passed"], d.get("runtime", ""), d.get("worst"), dict(d["outputs"]),
                   d.get("fp32_worst"), d.get("vs_fp32"))


@dataclass(frozen=True)
class Memory:
    peak_rss_mb: float
    baseline_rss_mb: float | None = None  # the runtime process before it loaded the model

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Memory | None:
        return None if d is None else cls(**d)


@dataclass(frozen=True)
class TargetReport:
    name: str
    status: str  # passed | failed | error | skipped
    reason: str | None = None
    precision: str = "fp32"
    artifacts: tuple[ArtifactFile, ...] = ()
    conversion: Conversion | None = None
    numerics: Numerics | None = None
    latency: Latency | None = None
    memory: Memory | None = None
    findings: tuple[dict[str, str], ...] = ()  # {severity, code, message}
    log: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # shapes this target ran
    # dynamic-shape sweep: one entry per extra shape {input_shapes, status, reason, worst}
    sweep: tuple[dict[str, Any], ...] = ()
    # first-divergence localization: {method, probes, first_divergence {node, op_type, ...}}
    diagnostics: dict[str, Any] | None = None
    latency_unavailable: str | None = None  # why ``latency`` is absent although the target ran
    # deployment snippets from the backend: language (kotlin, swift, cpp, python) -> code
    snippets: dict[str, str] = field(default_factory=dict)
    # a quantized source: {source {scheme, ops, int8_weights, ...}, route, fallback, bytes,
    # source_bytes, size_ratio, size_limit, kept {int8_tensors, same_ints_and_scales, ...}}
    compressed: dict[str, Any] | None = None
    # target vs reference timed interleaved: ratio_p50, ci95, rounds, spreads, noisy (see
    # validators.latency.interleaved); None where the two could not be timed together
    latency_vs_reference: dict[str, Any] | None = None
    # --baseline: {file, same_source, checks: [{check, status, message, ...}]}
    baseline: dict[str, Any] | None = None
    # --eval-data: {metric, reference, target, drop_points, max_drop_points, items, passed,
    # output}
    accuracy: dict[str, Any] | None = None
    # --profile: {runtime, runs, total_ms, operators, ops: [{name, op_type, ms, share}],
    # op_types: [{op_type, ms, share, count}]}, or {unavailable: why} / {error: why}
    profile: dict[str, Any] | None = None
    # generative models: {steps, tokens_agree, first_mismatch_step, ties, prompt_tokens,
    # reference_tokens, target_tokens, step_max_abs_error, time_to_first_token_ms,
    # decode_ms_p50/p90, kv_cache_bytes, ...} (see mtconvert.generation.judge)
    generation: dict[str, Any] | None = None
    # a pruned source: {source_zero_share, artifact: {...}, artifact_zero_share, kept}
    # (see mtconvert.sparsity)
    sparsity: dict[str, Any] | None = None
    # a failing int8 artifact converted again with layers kept in float (mtconvert.run.fallback):
    # {applied, reason} when it could not run; else {applied, passed, kept: [node], weight_layers,
    # rounds: [{kept, status, numerics_passed, worst}], first: the first artifact's worst}
    float_fallback: dict[str, Any] | None = None

    def ratio_to_reference(self, ref_p50_ms: float | None) -> tuple[float, bool] | None:
        """(target p50 / reference p50, whether the machine was too noisy to tell): from the
        interleaved timing when there is one, else from the two separate timings (never noisy
        by that measure, but then only as good as two timings at different moments)."""
        vs = self.latency_vs_reference or {}
        if "ratio_p50" in vs:
            return vs["ratio_p50"], bool(vs.get("noisy"))
        if self.latency and ref_p50_ms:
            return self.latency.p50_ms / ref_p50_ms, False
        return None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["artifacts"] = [asdict(a) for a in self.artifacts]
        d["findings"] = list(self.findings)
        d["sweep"] = list(self.sweep)
        if self.conversion is not None:
            d["conversion"]["steps"] = list(self.conversion.steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetReport:
        return cls(name=d["name"], status=d["status"], reason=d.get("reason"),
                   precision=d.get("precision", "fp32"),
                   compressed=d.get("compressed"),
                   artifacts=tuple(ArtifactFile(**a) for a in d.get("artifacts", ())),
                   conversion=Conversion.from_dict(d.get("conversion")),
                   numerics=Numerics.from_dict(d.get("numerics")),
                   latency=Latency.from_dict(d.get("latency")),
                   memory=Memory.from_dict(d.get("memory")),
                   findings=tuple(d.get("findings", ())), log=d.get("log"),
                   timings=dict(d.get("timings", {})),
                   input_shapes=dict(d.get("input_shapes", {})),
                   sweep=tuple(d.get("sweep", ())), diagnostics=d.get("diagnostics"),
                   latency_unavailable=d.get("latency_unavailable"),
                   snippets=dict(d.get("snippets") or {}),
                   latency_vs_reference=d.get("latency_vs_reference"),
                   baseline=d.get("baseline"), accuracy=d.get("accuracy"),
                   profile=d.get("profile"),
                   generation=d.get("generation"), sparsity=d.get("sparsity"),
                   float_fallback=d.get("float_fallback"))


@dataclass(frozen=True)
class SourceInfo:
    path: str | None
    format: str
    sha256: str | None
    inputs: tuple[dict[str, Any], ...]  # {name, shape, dtype}; shape keeps dynamic axis names
    outputs: tuple[dict[str, Any], ...]
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # shapes validated
    input_values: dict[str, str] = field(default_factory=dict)  # how each input was made
    sparsity: dict[str, Any] | None = None  # a pruned source's weights (mtconvert.sparsity)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceInfo:
        return cls(d.get("path"), d["format"], d.get("sha256"), tuple(d["inputs"]),
                   tuple(d["outputs"]), dict(d.get("input_shapes", {})),
                   dict(d.get("input_values", {})), d.get("sparsity"))


@dataclass(frozen=True)
class ReferenceInfo:
    runtime: str
    version: str | None
    latency: Latency | None
    profile: dict[str, Any] | None = None  # --profile, as TargetReport.profile

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReferenceInfo:
        return cls(d["runtime"], d.get("version"), Latency.from_dict(d.get("latency")),
                   d.get("profile"))


class TargetMap(Mapping[str, TargetReport]):
    """Target reports by name, in the order they were requested. Serialises as a list."""

    def __init__(self, reports: tuple[TargetReport, ...] | list[TargetReport] = ()):
        self._items = {r.name: r for r in reports}

    def __getitem__(self, name: str) -> TargetReport:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"TargetMap({list(self._items.values())!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TargetMap) and list(self.values()) == list(other.values())

    def __hash__(self) -> int:
        return hash(tuple(self._items.values()))


@dataclass(frozen=True)
class Report:
    source: SourceInfo
    reference: ReferenceInfo | None
    targets: TargetMap
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per shared stage
    mtconvert_version: str = ""
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        """True when at least one target ran and every target passed."""
        return bool(self.targets) and all(t.status == "passed" for t in self.targets.values())

    @property
    def exit_code(self) -> int:
        statuses = {t.status for t in self.targets.values()}
        if "error" in statuses:
            return EXIT_BACKEND
        return EXIT_PASSED if self.ok else EXIT_CHECK_FAILED

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "ok": self.ok,
                "mtconvert_version": self.mtconvert_version, "created": self.created,
                "settings": self.settings, "timings": self.timings,
                "source": asdict(self.source),
                "reference": asdict(self.reference) if self.reference else None,
                "targets": [t.to_dict() for t in self.targets.values()]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported report schema_version {d.get('schema_version')!r}")
        ref = d.get("reference")
        return cls(source=SourceInfo.from_dict(d["source"]),
                   reference=ReferenceInfo.from_dict(ref) if ref else None,
                   targets=TargetMap([TargetReport.from_dict(t) for t in d["targets"]]),
                   settings=dict(d.get("settings", {})), timings=dict(d.get("timings", {})),
                   mtconvert_version=d.get("mtconvert_version", ""), created=d.get("created", ""))

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))
