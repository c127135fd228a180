"""ncnn int8 layers from a quantized source (issue 20) against ncnn fp32 of the float model and
ONNX Runtime, side by side. Goal: int8 p50 <= 0.7x float where the runtime has integer kernels;
where not, the layers that stay float are named (the conversion's steps, printed).

Cases: the float BERT fixture beside its two int8 fixtures (sequence 16), and a 6-layer,
384-wide BERT (bench_runtimes.make_bert, random weights) quantized by ORT's quantize_static
QDQ, per-tensor and per-channel (bench_compressed._quantize, calibrated on the lowering
checks' inputs), at --seq. Each model goes through `mtconvert --to ncnn` once (the report
gives the status, sizes, error against the source and the steps); the timing is then done here
in one process: ncnn fp32 (float model), ncnn int8 (quantized source), ORT on the float model
and ORT on the quantized source (its integer kernels), in interleaved rounds (the order
rotates each round), --threads each; p50 of each runner per repeat, and the int8/fp32 ratio
per repeat with its spread. Per-layer-type time of the ncnn int8 and fp32 models comes from
backends/profiling/ncnn.py (layer by layer through the extractor). Asserts nothing.

    .venv/bin/python benchmarks/bench_ncnn_int8.py [--seq 128] [--repeats 5] [--rounds 10]
        [--iterations 10] [--threads 2] [--skip-big] [--skip-fixtures] [--work DIR]
        [--snapshot WORKTREE] [--no-ort] [--reuse]

--snapshot: `git worktree add -f /tmp/wt <older commit>` converts the quantized sources with
that tree's code too (/tmp/snap/sitecustomize.py maps the editable install to it), and its
ncnn artifacts run in the same interleaved rounds, labelled "before".

The machine may be shared (other jobs running): the 1-minute load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compressed import _quantize  # noqa: E402
from bench_runtimes import make_bert  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
REUSE = False  # --reuse
SNAP_PATH = Path("/tmp/snap")  # its sitecustomize.py maps mtconvert to $MTCONVERT_SNAPSHOT


def convert(src: Path, out: Path, seq: int, threads: int, snapshot: Path | None = None) -> dict:
    """One `mtconvert --to ncnn` run: the ncnn target's report entry (+ its .param path).
    ``snapshot``: run the code of that worktree (an older commit) instead, through
    ``--snap-path``'s sitecustomize.py (MTCONVERT_SNAPSHOT)."""
    tag = "before" if snapshot else "now"
    report = out / f"{src.stem}.{tag}.json"
    if REUSE and report.is_file():  # --reuse: an earlier run's conversion in --work
        return _entry(report)
    env = dict(os.environ)
    if snapshot:
        env |= {"MTCONVERT_SNAPSHOT": str(snapshot), "PYTHONPATH": str(SNAP_PATH)}
    proc = subprocess.run([MTCONVERT, str(src), "--to", "ncnn", "--out",
                           str(out / f"{src.stem}.{tag}"), "--input-shape", f"input_ids=1x{seq}",
                           "--input-shape", f"attention_mask=1x{seq}", "--threads", str(threads),
                           "--iterations", "5", "--report-json", str(report), "--no-cache",
                           "-q"], capture_output=True, text=True, env=env)
    if not report.is_file():
        sys.exit(f"{src.name}: no report (exit {proc.returncode}): {proc.stderr[-400:]}")
    return _entry(report)


def _entry(report: Path) -> dict:
    t = json.loads(report.read_text())["targets"][0]
    t["param"] = next((a["path"] for a in t["artifacts"] if a["path"].endswith(".param")), None)
    return t


class NcnnRunner:
    """ncnn.Net as mtconvert's session opens it (fp16 off, int8 inference on), fed by the
    source's input order (in0, in1...: an Embed-read input as int32, others float32)."""

    def __init__(self, param: str, threads: int):
        import ncnn

        from mtconvert.backends.ncnn import param_io, param_layers

        self.ncnn, self.net = ncnn, ncnn.Net()
        o = self.net.opt
        o.num_threads = threads
        o.use_fp16_storage = o.use_fp16_arithmetic = o.use_fp16_packed = False
        o.use_bf16_storage = False
        o.use_int8_inference = True
        assert self.net.load_param(param) == 0
        assert self.net.load_model(str(Path(param).with_suffix(".bin"))) == 0
        self.ins, self.outs = param_io(Path(param))
        self.layers = [(k, n, tops) for k, n, _, tops, _ in param_layers(Path(param))]

    def extractor(self, feeds: list[np.ndarray]):  # noqa: ANN201
        ex = self.net.create_extractor()
        for i, value in zip(self.ins, feeds, strict=True):
            arr = np.ascontiguousarray(value[0], np.int32 if i["int"] else np.float32)
            ex.input(i["blob"], self.ncnn.Mat(arr).clone())
        return ex

    def __call__(self, feeds: list[np.ndarray]) -> np.ndarray:
        ret, mat = self.extractor(feeds).extract(self.outs[0])
        assert ret == 0
        return np.array(mat.numpy()).reshape(-1)


class OrtRunner:
    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]

    def __call__(self, feeds: list[np.ndarray]) -> np.ndarray:
        return self.sess.run(None, dict(zip(self.names, feeds, strict=True)))[0].reshape(-1)


def interleaved(runners: dict, feeds: list[np.ndarray], rounds: int,
                iterations: int) -> dict[str, float]:
    """p50 ms of each runner over rounds in which every runner runs ``iterations`` times, the
    order rotating each round (one warm-up round first)."""
    times: dict[str, list[float]] = defaultdict(list)
    names = list(runners)
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(iterations):
                t0 = time.perf_counter()
                runners[name](feeds)
                if r:
                    times[name].append((time.perf_counter() - t0) * 1000)
    return {n: statistics.median(v) for n, v in times.items()}


def by_type(runner: NcnnRunner, feeds: list[np.ndarray], runs: int = 5) -> dict[str, float]:
    from mtconvert.backends.profiling import ncnn as prof

    out: dict[str, float] = defaultdict(float)
    for op in prof.profile(lambda: runner.extractor(feeds), runner.layers, runs):
        out[op.op_type] += op.ms
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _same_files(a: dict, b: dict) -> bool:
    if not a["param"] or not b["param"]:
        return False
    pa, pb = Path(a["param"]), Path(b["param"])
    return pa.read_bytes() == pb.read_bytes() and \
        pa.with_suffix(".bin").read_bytes() == pb.with_suffix(".bin").read_bytes()


def _err(a: np.ndarray, b: np.ndarray) -> str:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    return f"max abs {np.abs(a - b).max():.3g}, cosine {cos:.6f}"


def case(title: str, float_src: Path, quant: dict[str, Path], seq: int, work: Path,
         args: argparse.Namespace) -> None:
    import onnx

    from mtconvert.backends.lowering import check

    model = onnx.load(str(float_src))
    feeds = check.make_feeds(model, {"input_ids": [1, seq], "attention_mask": [1, seq]},
                             check.embedding_sizes(model))[1]  # one padded position
    order = [i.name for i in model.graph.input]
    feed_list = [feeds[n] for n in order]
    reports = {"float": convert(float_src, work, seq, args.threads)}
    reports |= {k: convert(p, work, seq, args.threads) for k, p in quant.items()}
    if args.snapshot:  # the same quantized sources through the older code
        reports |= {f"{k}, before": convert(p, work, seq, args.threads, args.snapshot)
                    for k, p in quant.items()}
        quant = quant | {f"{k}, before": p for k, p in quant.items()}
    print(f"\n## {title}: batch 1, sequence {seq}, {args.threads} threads")
    print("| model | ncnn status | precision | files | vs source | error vs its source "
          "(mtconvert) | int8 tensors = source's |")
    print("|---|---|---|---|---|---|---|")
    sources = {"float": float_src, **quant}
    for k, t in reports.items():
        size = sum(a["bytes"] for a in t["artifacts"] if not a["path"].endswith(".log"))
        w = (t.get("numerics") or {}).get("worst") or {}
        kept = (t.get("compressed") or {}).get("kept") or {}
        k_s = f"{kept['same_ints_and_scales']}/{kept['int8_tensors']}" if kept else "-"
        print(f"| {k} | {t['status']} | {t['precision']} | {size / 1024:.0f} KiB "
              f"| {size / sources[k].stat().st_size:.2f}x | max abs {w.get('max_abs', 0):.3g}, "
              f"cosine {w.get('cosine', 0):.6f} | {k_s} |")
    for k, t in reports.items():
        for s in t.get("conversion", {}).get("steps", []):
            if s.startswith("int8:"):
                print(f"  {k}: {s[:400]}")
    runners: dict = {"ncnn fp32 (float)": NcnnRunner(reports["float"]["param"], args.threads),
                     "ORT (float)": OrtRunner(float_src, args.threads)}
    for k, p in quant.items():
        now = reports.get(k.removesuffix(", before"))
        if k.endswith(", before") and _same_files(reports[k], now):
            print(f"  {k}: the same .param/.bin as now (timed once)")
        elif reports[k]["param"]:
            runners[f"ncnn {reports[k]['precision']} ({k})"] = NcnnRunner(reports[k]["param"],
                                                                          args.threads)
        if not k.endswith(", before") and not args.no_ort:
            runners[f"ORT ({k})"] = OrtRunner(p, args.threads)
    ort_float = runners.pop("ORT (float)")
    ref = ort_float(feed_list)
    if not args.no_ort:
        runners = {"ncnn fp32 (float)": runners["ncnn fp32 (float)"], "ORT (float)": ort_float,
                   **runners}
    for name, run in runners.items():
        if name != "ORT (float)":
            print(f"  {name} vs ORT on the float model: {_err(ref, run(feed_list))}")
    p50s: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.repeats):
        for n, v in interleaved(runners, feed_list, args.rounds, args.iterations).items():
            p50s[n].append(v)
    base = p50s["ncnn fp32 (float)"]
    print(f"\np50 ms over {args.repeats} repeats (each {args.rounds} interleaved rounds x "
          f"{args.iterations} runs); ratio to ncnn fp32 per repeat: median [min-max]; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| runner | p50 ms median [min-max] | / ncnn fp32 (float) |")
    print("|---|---|---|")
    for n, v in p50s.items():
        r = [a / b for a, b in zip(v, base, strict=True)]
        print(f"| {n} | {statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}] "
              f"| {statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}] |")
    print("\nncnn time by layer type (ms, median of 5 runs, layer by layer):")
    for n, run in runners.items():
        if n.startswith("ncnn"):
            top = list(by_type(run, feed_list).items())[:8]
            print(f"  {n}: " + ", ".join(f"{k} {ms:.2f}" for k, ms in top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-big", action="store_true", help="the fixtures only")
    ap.add_argument("--skip-fixtures", action="store_true", help="the 6-layer BERT only")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--no-ort", action="store_true",
                    help="time ncnn only (ORT on the float model still gives the error column)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the conversions an earlier run left in --work")
    ap.add_argument("--snapshot", type=Path, default=None,
                    help="a worktree of an older commit: its conversions of the quantized "
                    "sources are timed beside this tree's (before/after in one run)")
    args = ap.parse_args()
    global REUSE
    REUSE = args.reuse
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        fx = ROOT / "fixtures"
        if not args.skip_fixtures:
            case("fixtures (2 layers, 64 wide)", fx / "bert_encoder.onnx",
                 {m: fx / f"{m}.onnx" for m in ("bert_int8_qdq", "bert_int8_dynamic")}, 16,
                 work, args)
        if args.skip_big:
            return
        import onnx

        from mtconvert.backends.lowering import check

        big = make_bert(work / "bert6.onnx", seq=args.seq)
        m = onnx.load(str(big))
        calib = check.make_feeds(m, {"input_ids": [2, args.seq], "attention_mask": [2, args.seq]},
                                 check.embedding_sizes(m), seed=7)
        quant = {}
        for mode in ("qdq-per-tensor", "qdq-per-channel"):
            quant[mode] = work / f"bert6_{mode}.onnx"
            if not quant[mode].is_file():
                _quantize(big, quant[mode], mode, calib)
        case("BERT 6 layers x 384 (random weights), ORT quantize_static QDQ", big, quant,
             args.seq, work, args)


if __name__ == "__main__":
    main()
