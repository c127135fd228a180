"""Matrix executors on this machine (issue 18). Prints, from one run, side by side:

1. a small matrix of real cells (two fixtures x onnx-mobile x fp32/int8, conversion cache off,
   so every cell converts, validates and times for real): wall time with 1 local worker,
   2 local workers and Ray (a local instance with 2 CPUs, started once before the rounds and
   timed on its own);
2. the scheduling overhead per cell: a matrix of trivially fast real cells (a tiny ONNX
   model to onnx-mobile, one iteration, warm conversion cache) run with 1 worker, where
   overhead per cell = wall / cells - the mean of the cells' own time (``Cell.seconds``,
   measured inside each cell's process from start to result). It is what the matrix adds
   around a cell: the cell's own process (spawn + imports), result file, gathering.

Executors are interleaved (1, 2, ray, then ray, 2, 1, ...) and each figure is the median of
the rounds with its spread (min-max). No fake backend: every cell is a real conversion.

    .venv/bin/python benchmarks/bench_matrix.py [--rounds 2] [--trivial-cells 6]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REAL = """
targets = ["onnx-mobile"]
precisions = ["fp32", "int8"]
[options]
iterations = 3
warmup = 1
cache = false
[models.bert_encoder]
path = "{root}/fixtures/bert_encoder.onnx"
inputs = "{root}/fixtures/bert_encoder.inputs.npz"
[models.bert_distilled]
path = "{root}/fixtures/bert_distilled.onnx"
inputs = "{root}/fixtures/bert_distilled.inputs.npz"
"""
CONFIGS = (("1 worker", {"jobs": 1}), ("2 workers", {"jobs": 2}),
           ("ray (2 CPUs)", {"executor": "ray"}))
OVERHEAD = (("local", {"jobs": 1}), ("ray", {"executor": "ray", "jobs": 1}))


def tiny_onnx(path: Path) -> Path:
    """ids [1, seq] -> Gather -> ReduceMean -> MatMul -> logits: converts and runs in ~1 s."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((50, 8)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["p"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["p", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], [emb, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def trivial_matrix(tmp: Path, cells: int) -> Path:
    model = tiny_onnx(tmp / "tiny.onnx")
    text = 'targets = ["onnx-mobile"]\n[options]\niterations = 1\nwarmup = 0\n'
    text += "".join(f'[models.m{i}]\npath = "{model}"\n' for i in range(cells))
    path = tmp / "trivial.toml"
    path.write_text(text)
    return path


def run(matrix_file: Path, out: Path, config: dict) -> tuple[float, object]:
    import mtconvert

    t0 = time.perf_counter()
    report = mtconvert.matrix(matrix_file, out, **config)
    return time.perf_counter() - t0, report


def spread(values: list[float]) -> str:
    return (f"{statistics.median(values):7.1f} s  (min {min(values):.1f}, max {max(values):.1f},"
            f" n={len(values)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trivial-cells", type=int, default=6)
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-matrix-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["MTCONVERT_CACHE_DIR"] = str(tmp / "cache")  # the cells' children inherit it
        real = tmp / "real.toml"
        real.write_text(REAL.format(root=ROOT))
        trivial = trivial_matrix(tmp, args.trivial_cells)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, object_store_memory=100 * 2**20)
        ray_start = time.perf_counter() - t0
        _, warm = run(trivial, tmp / "warm", {"jobs": 1})  # fills the trivial cells' cache
        if not warm.ok:
            raise SystemExit(f"the trivial cells do not pass: {warm.cells[0].reason}")
        walls = {name: [] for name, _ in CONFIGS}
        overhead = {name: [] for name, _ in OVERHEAD}
        statuses, trivial_own = set(), []
        for r in range(args.rounds):
            order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
            for name, config in order:
                wall, report = run(real, tmp / f"real-{r}-{config.get('jobs', 'ray')}", config)
                walls[name].append(wall)
                statuses |= {c.status for c in report.cells}
                print(f"round {r + 1} {name:13} done", file=sys.stderr, flush=True)
            for name, config in (OVERHEAD if r % 2 == 0 else OVERHEAD[::-1]):
                wall, report = run(trivial, tmp / f"triv-{r}-{name[0]}", config)
                own = statistics.mean(c.seconds for c in report.cells)
                overhead[name].append(wall / len(report.cells) - own)
                trivial_own.append(own)
                print(f"round {r + 1} trivial {name} done", file=sys.stderr, flush=True)
        ray.shutdown()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"Ray local instance start (once, not in the figures below): {ray_start:.1f} s")
    print(f"\n1. real matrix: 2 fixtures x onnx-mobile x fp32/int8 = 4 cells, cache off "
          f"(cell statuses: {', '.join(sorted(statuses))})")
    for name, _ in CONFIGS:
        print(f"   {name:13} wall {spread(walls[name])}")
    print(f"\n2. scheduling overhead per cell ({args.trivial_cells} trivial real cells, one at "
          "a time; wall / cells - the cell's own time; a cell's own time: median "
          f"{statistics.median(trivial_own):.1f} s)")
    for name, _ in OVERHEAD:
        print(f"   {name:13} {spread(overhead[name])}")


if __name__ == "__main__":
    main()
