"""Every option of a run, described once. The CLI (converter/cli.py) and the Python API
(converter/api.py) are generated from these lists and from each backend's ``Backend.options``;
``build`` turns given values into ConvertOptions. Backend options are found through the
registry, so a plugin's options appear without the framework knowing them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtconvert.backends.options import Option
from mtconvert.errors import UsageError
from mtconvert.validators.tolerances import HELP, KEYS as TOLERANCES

if TYPE_CHECKING:
    from mtconvert.options import ConvertOptions
    from mtconvert.registry import Registry

BOTH = ("convert", "validate")
ALL = ("convert", "validate", "verify")

CORE: tuple[Option, ...] = (
    Option("targets", "list", help="Targets, comma separated (default: every available target).",
           flag="--to", metavar="TARGETS"),
    Option("out_dir", "path", Path("build"), "Folder for the artifacts.", flag="--out",
           show_default=True),
    Option("precision", "choice", "fp32", "Artifact precision; picks the tolerance profile.",
           choices=("fp32", "fp16", "int8"), modes=BOTH, show_default=True),
    Option("input_shapes", "shape", None, "Fix an input's shape (repeatable). Named dynamic "
           "axes follow to other inputs.", modes=BOTH, flag="--input-shape",
           metavar="NAME=1x128"),
    Option("inputs", "data", None, "Validation inputs (.npz by name).", modes=BOTH),
    Option("threads", "int", None, "Threads for reference and targets.", modes=ALL),
    Option("warmup", "int", 3, modes=ALL, show_default=True),
    Option("iterations", "int", 20, "Timed runs per side, at least (interleaved timing runs "
           "rounds of at least 25 ms, and more rounds while the ratio is unclear).", modes=ALL,
           show_default=True),
    Option("seed", "int", 0, "Seed of generated inputs.", modes=BOTH, show_default=True),
    *(Option(key, "tolerance", None, HELP[key], modes=BOTH, metavar="[OUTPUT:]VALUE")
      for key in TOLERANCES),
    Option("timeout", "float", 900.0, "Seconds allowed per conversion step and per validation "
           "run.", modes=ALL, show_default=True),
    Option("trust_pickle", "bool", False, "Load pickle-based models (.pt/.pth TorchScript or "
           "torch.save, pickled .pt2 payloads); loading a pickle can run arbitrary code.",
           modes=BOTH),
    Option("max_model_bytes", "int", None, "Refuse larger model files.", modes=BOTH),
    Option("calibration", "path", None, "int8 calibration inputs (.npz by name; samples "
           "stacked on a first axis)."),
    Option("jobs", "int", None, "Targets converting at once (default: number of cores).",
           short="-j"),
    Option("cache", "bool", True, "Convert again even when a cached conversion fits.",
           flag="--no-cache"),
    Option("seq_lens", "ints", None, "Also validate at these sequence lengths (dynamic axis 1).",
           metavar="8,64,128"),
    Option("batch_sizes", "ints", None, "Also validate at these batch sizes (dynamic axis 0).",
           metavar="1,4"),
    Option("sparse", "bool", False, "Store a pruned source's zero weights sparsely where the "
           "target can (Core ML sparse weights, TFLite sparse tensors); the report says per "
           "target how they are stored, or why not."),
    Option("float_fallback", "bool", True, "int8: do not re-convert a failing artifact with "
           "the layers adding the most quantization error kept in float.",
           flag="--no-float-fallback", modes=("convert",)),
    Option("localize", "bool", False, "Name the first diverging operator even when numerics "
           "pass."),
    Option("profile", "bool", False, "Add each target's top operators by time to the report "
           "(the runtime's own profiler: ONNX Runtime, ncnn per layer, ExecuTorch's ETDump; "
           "where a runtime has none, the report says so).", modes=ALL),
    Option("save_baseline", "path", None, "Keep this run's measurements (latency samples, "
           "size, errors) here, for a later --baseline.", modes=BOTH),
    Option("baseline", "path", None, "Fail a target that got slower, larger or less exact "
           "than in this baseline (written by --save-baseline).", modes=BOTH),
    Option("max_latency_regression", "float", 0.10, "With --baseline: the p50 latency "
           "increase that fails (0.10: 10 %), judged with its confidence interval.",
           modes=BOTH, show_default=True),
    Option("max_size_growth", "float", 0.05, "With --baseline: the artifact size growth that "
           "fails (0.05: 5 %).", modes=BOTH, show_default=True),
    Option("float_model", "path", None, "The float original of a compressed (quantized) "
           "source: each target is also compared with it (int8 profile).", modes=BOTH,
           metavar="PATH"),
    Option("eval_data", "path", None, "Task accuracy on this dataset (.npz: the inputs by name, "
           "items stacked on axis 0, and `labels`: class ids per item or per token, -100 "
           "ignored; without labels, embeddings' nearest-neighbour agreement).", modes=BOTH),
    Option("max_accuracy_drop", "float", None, "With --eval-data: the drop in percentage "
           "points that fails (default 0 at fp32, 0.5 at fp16/int8).", modes=BOTH),
    Option("from_report", "path", None, "Validate the artifacts this convert report (JSON) "
           "lists, by their role (side files and logs are not artifacts).", modes=("validate",)),
    Option("bundle", "path", None, "Write a golden bundle per target here (artifact, inputs, "
           "reference outputs, tolerances, tool versions) for `mtconvert verify`."),
    Option("task", "choice", None, "What a Hugging Face model folder is converted for "
           "(default: from config.json's architectures).",
           choices=("text-generation", "text2text-generation",
                    "automatic-speech-recognition", "text-encoding")),
    Option("prompt", "str", None, "Generation: the prompt, tokenized by the folder's "
           "tokenizer.json."),
    Option("prompt_ids", "ints", None, "Generation: the prompt as token ids, exactly as given "
           "(special tokens included).", metavar="5,17,42"),
    Option("max_new_tokens", "int", 16, "Generation: tokens decoded greedily and compared "
           "with the reference.", show_default=True),
    Option("max_cache", "int", None, "Generation: KV-cache slots of the decode-step graph "
           "(default: prompt + new tokens, rounded up to 16)."),
)

# How the CLI reads its options and shows progress and errors; not options of a run.
PRESENTATION: tuple[Option, ...] = (
    Option("config", "path", None, "Read options from this TOML file (default: ./mtconvert.toml, "
           "or [tool.mtconvert] in ./pyproject.toml); command-line options override it.",
           modes=ALL),
    Option("quiet", "bool", False, "No progress lines, only the report.", modes=ALL, short="-q"),
    Option("verbose", "bool", False, "Progress lines on stderr even when it is not a terminal.",
           modes=ALL, short="-v"),
    Option("debug", "bool", False, "Show tracebacks.", modes=ALL),
)

# ConvertOptions field of an option whose name differs
_FIELDS = {"timeout": "timeout_s"}


def core(mode: str) -> list[Option]:
    return [o for o in CORE if mode in o.modes]


def backend_options(registry: Registry, mode: str) -> list[Option]:
    """Options the registered backends declare for ``mode`` (a plugin that fails to load
    declares none); each tagged with its backend. The first declaration of a name wins."""
    from dataclasses import replace

    from mtconvert.registry import BackendLoadError

    found: dict[str, Option] = {}
    for name in registry.names():
        try:
            cls = registry.get(name)
        except BackendLoadError:
            continue
        for opt in cls.options:
            if mode in opt.modes and opt.name not in found:
                found[opt.name] = replace(opt, backend=name)
    return list(found.values())


def build(mode: str, values: dict[str, Any], registry: Registry | None = None,
          extra: dict[str, Any] | None = None) -> ConvertOptions:
    """ConvertOptions from named values (API keywords, CLI values): each checked by its Option.
    An unknown name is a TypeError, as for any Python function."""
    from mtconvert.options import ConvertOptions
    from mtconvert.registry import default_registry
    from mtconvert.validators.tolerances import ToleranceOverrides

    specs = {o.name: o for o in core(mode)}
    backend = {o.name: o for o in backend_options(registry or default_registry(), mode)}
    unknown = sorted(set(values) - set(specs) - set(backend))
    if unknown:
        raise TypeError(f"unexpected option(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(set(specs) | set(backend)))}")
    parsed = {k: specs[k].parse(v) for k, v in values.items() if k in specs}
    extra = dict(extra or {})
    if "bundle" in extra:  # older API spelling: extra={"bundle": DIR}
        parsed.setdefault("bundle", Path(extra.pop("bundle")))
    extra |= {k: backend[k].parse(v) for k, v in values.items()
              if k in backend and v is not None and v != backend[k].default}
    fields: dict[str, Any] = {_FIELDS.get(k, k): v for k, v in parsed.items()
                              if v is not None and k not in TOLERANCES}
    if fields.get("targets") == ():
        raise UsageError("give at least one target name")
    tol = ToleranceOverrides.from_values({k: parsed.get(k) for k in TOLERANCES})
    return ConvertOptions(**fields, tolerances=tol, extra=extra)

