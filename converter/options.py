"""Options of a run, as the run skeleton uses them (built by mtconvert.optspec from the CLI, the
Python API or a config file)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtconvert.backends.base import PRECISIONS, TargetOptions
from mtconvert.errors import UsageError
from mtconvert.validators.compare import ToleranceOverrides


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class ConvertOptions:
    targets: tuple[str, ...] | None = None  # None: every available target
    out_dir: Path = Path("build")
    precision: str = "fp32"
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    inputs: Any = None  # path to .npz, or dict name -> array
    threads: int = field(default_factory=default_threads)
    warmup: int = 3
    iterations: int = 20
    seed: int = 0
    tolerances: ToleranceOverrides = field(default_factory=ToleranceOverrides)
    timeout_s: float | None = 900.0
    calibration: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific switches
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)  # targets converting at once
    cache: bool = True  # reuse conversions from the cache (see mtconvert.cache)
    trust_pickle: bool = False  # allow loading pickle payloads (they can run code)
    localize: bool = False  # first-divergence localization even when numerics pass
    # a failing int8 artifact re-converted with its worst layers in float (mtconvert.run.fallback)
    float_fallback: bool = True
    profile: bool = False  # each artifact's top operators by time, from its runtime's profiler
    seq_lens: tuple[int, ...] = ()  # dynamic-shape sweep: sequence lengths (axis 1)
    batch_sizes: tuple[int, ...] = ()  # dynamic-shape sweep: batch sizes (axis 0)
    max_model_bytes: int | None = None  # refuse larger model files
    bundle: Path | None = None  # write a golden bundle per target here
    from_report: Path | None = None  # validate: the artifacts a convert report lists
    eval_data: Path | None = None  # task accuracy on this dataset (.npz: inputs, labels)
    float_model: Path | None = None  # a compressed source's float original (float_compare)
    max_accuracy_drop: float | None = None  # points; None: by profile (fp32 0, else 0.5)
    save_baseline: Path | None = None  # keep this run's measurements here
    baseline: Path | None = None  # gate this run against an earlier run's measurements
    max_latency_regression: float = 0.10  # with --baseline: 10 % slower fails
    max_size_growth: float = 0.05  # with --baseline: 5 % larger fails
    # generative models from a Hugging Face folder (mtconvert.generation)
    task: str | None = None  # None: inferred from config.json's architectures
    prompt: str | None = None  # text, tokenized by the folder's tokenizer.json
    prompt_ids: tuple[int, ...] = ()  # token ids, exactly as given
    max_new_tokens: int = 16
    max_cache: int | None = None  # KV-cache slots; None: prompt + new tokens, rounded up
    sparse: bool = False  # a pruned source's zeros stored sparsely where a target can

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; "
                             f"choose one of {', '.join(PRECISIONS)}")
        if self.threads < 1:
            raise UsageError("--threads must be at least 1")
        if self.iterations < 1 or self.warmup < 0:
            raise UsageError("--iterations must be at least 1 and --warmup at least 0")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise UsageError("--timeout must be positive")
        if self.jobs < 1:
            raise UsageError("--jobs must be at least 1")
        if self.max_latency_regression < 0 or self.max_size_growth < 0:
            raise UsageError("--max-latency-regression and --max-size-growth must be >= 0")
        if any(n < 1 for n in (*self.seq_lens, *self.batch_sizes)):
            raise UsageError("--seq-lens and --batch-sizes take positive integers")

    def target_options(self, route: str = "", precision: str | None = None) -> TargetOptions:
        """What a backend gets of these options (``precision`` overrides the run's)."""
        from mtconvert.cache import default_root

        return TargetOptions(precision=precision or self.precision, threads=self.threads,
                             timeout_s=self.timeout_s, calibration=self.calibration,
                             extra=dict(self.extra), route=route,
                             cache_dir=(default_root() / "backends") if self.cache else None,
                             sparse=self.sparse)

    def settings(self) -> dict[str, Any]:
        """What the report records of these options."""
        return {"precision": self.precision, "threads": self.threads, "warmup": self.warmup,
                "iterations": self.iterations, "seed": self.seed, "timeout_s": self.timeout_s,
                "jobs": self.jobs, "cache": self.cache} | (
                    {"sparse": True} if self.sparse else {})  # --sparse: recorded when given
