"""The int8 float fallback (issue 20), side by side: per model, tflite full-integer int8 plain
(``--no-float-fallback``) and with the fallback: status, worst cosine and max abs against the
reference, the layers kept in float, rounds, file size, conversion seconds, and p50 latency.

Latency: the two artifacts are validated with ``mtconvert validate`` alternately (plain,
fallback, plain, ...) ``--repeats`` times; each validate run times its artifact interleaved
with the ONNX Runtime reference. Printed: the median p50 and its ratio to the reference, with
the spread (min-max) over the repeats. The machine is shared with other jobs: read the
spreads. Asserts nothing.

    .venv/bin/python benchmarks/bench_fallback.py [--models outlier_mlp,bert_encoder]
        [--repeats 3] [--threads 2] [--before TREE]

``--before TREE``: also convert with the mtconvert source tree TREE (e.g. a ``git worktree`` of
an older commit; the installed package is pointed at it for those conversions only), rows
``before plain`` / ``before fallback``; every artifact is validated and timed by the current
code, all interleaved.

``outlier_mlp`` is the test suite's 8-layer Tanh MLP with one outlier channel
(tests/converter/test_float_fallback.py), written to a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
INT8 = ["--to", "tflite", "--precision", "int8", "--int8-scheme", "full"]


def model_path(name: str, tmp: Path) -> Path:
    if name == "outlier_mlp":
        sys.path.insert(0, str(ROOT))
        from tests.converter.test_float_fallback import _outlier_mlp

        return _outlier_mlp(tmp / "outlier_mlp.onnx")
    return ROOT / "fixtures" / f"{name}.onnx"


# imported first by the child (PYTHONPATH): the editable install's finder pointed at TREE
SNAPSHOT = """import glob, importlib, os, site
root = os.environ["MTCONVERT_SNAPSHOT"]
pattern = os.path.join(site.getsitepackages()[0], "__editable___mtconvert_*_finder.py")
for path in glob.glob(pattern):
    finder = importlib.import_module(os.path.basename(path)[:-3])
    finder.MAPPING.update({"mtconvert": root + "/converter", "mtconvert.backends":
                           root + "/backends", "mtconvert.validators": root + "/validators"})
"""


def tree_env(tree: Path | None, tmp: Path) -> dict | None:
    if tree is None:
        return None
    (tmp / "snapshot").mkdir(exist_ok=True)
    (tmp / "snapshot" / "sitecustomize.py").write_text(SNAPSHOT)
    return {**os.environ, "PYTHONPATH": str(tmp / "snapshot"), "MTCONVERT_SNAPSHOT": str(tree)}


def convert(model: Path, out: Path, threads: int, *extra: str, env: dict | None = None) -> dict:
    report = out.with_suffix(".json")
    subprocess.run([MTCONVERT, str(model), *INT8, "--out", str(out), "--threads", str(threads),
                    "--iterations", "3", "--warmup", "1", "--report-json", str(report),
                    "--no-cache", "-q", *extra], capture_output=True, text=True, env=env)
    if not report.is_file():
        sys.exit(f"{model.name}: no report")
    return json.loads(report.read_text())["targets"][0]


def validate(model: Path, artifact: str, tmp: Path, threads: int) -> tuple[float, float]:
    report = tmp / "validate.json"
    subprocess.run([MTCONVERT, "validate", str(model), artifact, "--precision", "int8",
                    "--threads", str(threads), "--report-json", str(report), "-q"],
                   capture_output=True, text=True)
    t = json.loads(report.read_text())["targets"][0]
    return t["latency"]["p50_ms"], (t.get("latency_vs_reference") or {}).get("ratio_p50",
                                                                              float("nan"))


def describe(t: dict) -> str:
    worst = (t.get("numerics") or {}).get("worst") or {}
    f = t.get("float_fallback") or {}
    kept = (f"{len(f['kept'])}/{f['weight_layers']} kept in {len(f['rounds'])} round(s): "
            f"{', '.join(f['kept'])}" if f.get("applied") else f"fallback not run "
            f"({f.get('reason', 'numerics passed')})")
    size = sum(a["bytes"] for a in t.get("artifacts", ()))
    conv = (t.get("conversion") or {}).get("seconds", float("nan"))
    return (f"{t['status']:<7} cosine {worst.get('cosine', float('nan')):.6f}  max abs "
            f"{worst.get('max_abs', float('nan')):.3g}  {size / 1024:.1f} KB  convert "
            f"{conv:.1f} s  {kept}")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="outlier_mlp,bert_encoder")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--before", type=Path, default=None,
                    help="an older mtconvert source tree to convert with as well")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.models.split(","):
            model = model_path(name, tmp)
            trees = ([("before ", tree_env(args.before, tmp))] if args.before else []) + \
                [("", None)]
            runs = {}
            for label, env in trees:
                tag = label.strip() or "now"
                runs[f"{label}plain"] = convert(model, tmp / f"{name}-{tag}-plain", args.threads,
                                                "--no-float-fallback", env=env)
                runs[f"{label}fallback"] = convert(model, tmp / f"{name}-{tag}-fallback",
                                                   args.threads, env=env)
            times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
            for _ in range(args.repeats):  # interleaved: each artifact in turn, repeated
                for k, t in runs.items():
                    times[k].append(validate(model, t["artifacts"][0]["path"], tmp,
                                             args.threads))
            print(f"{name} -> tflite int8 full-integer")
            for k, t in runs.items():
                p50 = spread([p for p, _ in times[k]])
                ratio = spread([r for _, r in times[k]])
                print(f"  {k:<15} {describe(t)}\n                  p50 ms {p50}  vs reference "
                      f"{ratio}")


if __name__ == "__main__":
    main()
