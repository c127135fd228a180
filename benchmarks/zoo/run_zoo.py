"""Push every zoo model x export x target through the mtconvert CLI and write docs/zoo.md.

    .venv/bin/python benchmarks/zoo/run_zoo.py [--zoo build/zoo]
        [--targets tflite,ncnn,coreml,onnx-mobile] [--exports ts17,dynamo,pt2] [--only NAME,...]
        [--jobs 1] [--timeout S] [--force] [--doc docs/zoo.md] [--no-run]

One cell = one subprocess:
    .venv/bin/mtconvert ZOO/NAME/NAME.EXPORT --to TARGET --out ZOO/NAME/runs/EXPORT-TARGET
        --report-json ZOO/NAME/reports/EXPORT.TARGET.json --inputs ZOO/NAME/inputs.npz
        --timeout S -j 1 --warmup 1 --iterations 5 -q
Each cell's exit code, time and stderr tail go to ZOO/NAME/reports/EXPORT.TARGET.cell.json.
Resumable: a cell whose report JSON exists is not run again (nor one that timed out) unless
--force; a cell that ended without a report (exit 2/4) is run again next time. A cell whose
backend failed to import (mtconvert mid-edit by someone else) is retried up to 20 times a minute
apart, then left for the next run (not recorded as a result). After every cell ZOO/results.json (every cell on disk for the selection) and
the markdown page are rewritten, so a partial run leaves a consistent page. --no-run only
rewrites them. Cells run model by model (every export and target of a model, then the next).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import datetime as dt
import importlib.metadata as md
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXPORT_FILES = {"ts17": "{n}.ts17.onnx", "dynamo": "{n}.dynamo.onnx", "pt2": "{n}.pt2"}
ALL_TARGETS = ("tflite", "ncnn", "coreml", "onnx-mobile")
PACKAGES = ("mtconvert", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnxsim",
            "onnx2tf", "tensorflow", "ai-edge-litert", "ncnn", "pnnx", "coremltools",
            "onnx2torch")
LOCK = threading.Lock()


def cell_paths(zoo: Path, model: str, export: str, target: str) -> dict[str, Path]:
    d = zoo / model
    return {"model": d / EXPORT_FILES[export].format(n=model), "inputs": d / "inputs.npz",
            "out": d / "runs" / f"{export}-{target}",
            "report": d / "reports" / f"{export}.{target}.json",
            "cell": d / "reports" / f"{export}.{target}.cell.json"}


def command(mtconvert: str, p: dict[str, Path], target: str, timeout: int) -> list[str]:
    return [mtconvert, str(p["model"]), "--to", target, "--out", str(p["out"]),
            "--report-json", str(p["report"]), "--inputs", str(p["inputs"]),
            "--timeout", str(timeout), "-j", "1", "--warmup", "1", "--iterations", "5", "-q"]


# Other engineers edit mtconvert in the same working tree while the zoo runs: a backend that
# fails to import (a half-applied edit) is no result about the model. Such a cell is retried
# after a pause, and, if it persists, left without a cell record so the next run retries it.
TRANSIENT = re.compile(r"BackendLoadError|failed to load: (ImportError|SyntaxError|NameError|"
                       r"AttributeError|IndentationError)|^(ImportError|SyntaxError|"
                       r"IndentationError|ModuleNotFoundError)\b", re.M)
RETRIES, PAUSE = 20, 60


def transient(p: dict[str, Path], cell: dict) -> str | None:
    """Why the cell's outcome looks like mtconvert being mid-edit, or None."""
    texts = list(cell["stderr_tail"])
    if p["report"].is_file():
        try:
            rep = json.loads(p["report"].read_text())
            texts += [t.get("reason") or "" for t in rep.get("targets", [])]
        except ValueError:
            pass
    elif cell["exit_code"] not in (2, 4):
        return None
    hit = next((t for t in texts if TRANSIENT.search(t or "")), None)
    return one_line(hit, 200) if hit else None


def run_cell(mtconvert: str, p: dict[str, Path], target: str, timeout: int) -> dict:
    for attempt in range(1, RETRIES + 1):
        cell = _run_cell(mtconvert, p, target, timeout)
        why = transient(p, cell)
        if why is None:
            cell["attempts"] = attempt
            p["cell"].write_text(json.dumps(cell, indent=1))
            return cell
        print(f"    transient failure (attempt {attempt}/{RETRIES}): {why}", flush=True)
        if attempt < RETRIES:
            time.sleep(PAUSE)
    p["report"].unlink(missing_ok=True)  # not a result: leave the cell for the next run
    p["cell"].unlink(missing_ok=True)
    cell |= {"attempts": RETRIES, "transient": why}
    return cell


def _run_cell(mtconvert: str, p: dict[str, Path], target: str, timeout: int) -> dict:
    p["report"].parent.mkdir(parents=True, exist_ok=True)
    p["report"].unlink(missing_ok=True)
    cmd = command(mtconvert, p, target, timeout)
    t0 = time.monotonic()
    # a whole cell may take several steps of --timeout each (convert, reference, validation,
    # localization); the runner's own limit is a backstop
    limit = 4 * timeout + 120
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
        rc, timed_out = proc.returncode, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the cell's own process group only
        out, err = proc.communicate()
        rc, timed_out = None, True
    cell = {"command": " ".join(cmd), "exit_code": rc, "timed_out": timed_out,
            "seconds": round(time.monotonic() - t0, 1),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "stderr_tail": (err or "").strip().splitlines()[-5:],
            "stdout_tail": (out or "").strip().splitlines()[-3:]}
    return cell


def one_line(text: str | None, width: int = 300) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


def read_cell(zoo: Path, manifest: dict, model: str, export: str, target: str) -> dict | None:
    """The cell's result from disk, or None when it has not run."""
    rec = {"model": model, "export": export, "target": target}
    exp = manifest["models"].get(model, {}).get("exports", {}).get(export)
    if not exp or not exp.get("ok"):
        why = (exp or {}).get("error") or manifest["models"].get(model, {}).get("error") \
            or "not built"
        return rec | {"status": "not-exported", "reason": one_line(why)}
    p = cell_paths(zoo, model, export, target)
    cell = json.loads(p["cell"].read_text()) if p["cell"].is_file() else None
    if p["report"].is_file():
        try:
            rep = json.loads(p["report"].read_text())
        except ValueError as exc:
            return rec | {"status": "error", "reason": f"unreadable report: {exc}"}
        t = next((t for t in rep.get("targets", []) if t.get("name") == target), None)
        if t is None and rep.get("targets"):
            t = rep["targets"][0]
        if t is None:
            return rec | {"status": "error", "reason": "report has no target entry"}
        worst = (t.get("numerics") or {}).get("worst") or {}
        rec |= {"status": t.get("status"), "reason": one_line(t.get("reason")),
                "worst_output": worst.get("output"), "max_abs": worst.get("max_abs"),
                "cosine": worst.get("cosine"),
                "p50_ms": (t.get("latency") or {}).get("p50_ms"),
                "convert_seconds": (t.get("conversion") or {}).get("seconds"),
                "report": str(p["report"].relative_to(zoo))}
        diag = (t.get("diagnostics") or {}).get("first_divergence") or {}
        if diag:
            rec["first_divergence"] = f"{diag.get('node')} ({diag.get('op_type')})"
        if cell:
            rec |= {"exit_code": cell["exit_code"], "seconds": cell["seconds"]}
            if cell["exit_code"] == 4:  # crashed after writing its report
                tail = [ln for ln in cell["stderr_tail"] if ln.strip()
                        and "internal error" not in ln]
                rec["internal_error"] = one_line(tail[-1] if tail else "")
        return rec
    if cell is None:
        return None
    if cell["timed_out"]:
        return rec | {"status": "timeout", "seconds": cell["seconds"],
                      "reason": f"no result within {cell['seconds']:.0f} s (runner's limit)"}
    tail = [ln for ln in cell["stderr_tail"] if ln.strip()]
    return rec | {"status": "error", "exit_code": cell["exit_code"], "seconds": cell["seconds"],
                  "reason": one_line(f"exit {cell['exit_code']}, no report: "
                                     + (tail[-1] if tail else "(no stderr)"))}


def on_disk(zoo: Path) -> set[tuple[str, str]]:
    """(export, target) of every cell with a record under the zoo."""
    found = set()
    for f in zoo.glob("*/reports/*.json"):
        parts = f.name.removesuffix(".json").removesuffix(".cell").split(".", 1)
        if len(parts) == 2 and parts[0] in EXPORT_FILES:
            found.add((parts[0], parts[1]))
    return found


def git_state() -> str:
    """HEAD and how many of mtconvert's own files were edited but uncommitted when the page was
    written (other engineers edit the same tree while the zoo runs)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "converter", "backends",
                                "validators"], cwd=REPO, text=True, capture_output=True,
                               timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (f"the working tree at `{head}`" + (f", with {len(dirty)} files of converter/, "
            "backends/, validators/ edited and uncommitted at the time of writing (cells ran "
            "against the tree as it was when each ran)" if dirty else ""))


def versions() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def fmt_cell(c: dict | None) -> str:
    if c is None:
        return "·"
    s = c["status"]
    if s == "not-exported":
        return "n/a"
    if c.get("max_abs") is not None:
        cos = c.get("cosine")
        return f"{s} {c['max_abs']:.1e} / {cos:.6f}" if cos is not None else \
            f"{s} {c['max_abs']:.1e}"
    return s


def reason_key(reason: str) -> str:
    """A failure reason with its specifics (numbers, paths, quoted names) blurred, to count
    the common ones."""
    r = re.sub(r"/\S+", "<path>", reason)
    r = re.sub(r"(?<![\w.])[-+]?\d+(\.\d+)?(e[-+]?\d+)?(?![\w.])", "#", r)
    return r[:140]


def write_outputs(zoo: Path, manifest: dict, models: list[str], exports: list[str],
                  targets: list[str], doc: Path, runs: list[dict]) -> dict:
    cells = []
    for m in models:
        for e in exports:
            for t in targets:
                c = read_cell(zoo, manifest, m, e, t)
                if c is not None:
                    cells.append(c)
    by = {(c["model"], c["export"], c["target"]): c for c in cells}
    ran = [c for c in cells if c["status"] != "not-exported"]
    counts = {(e, t): [0, 0] for e in exports for t in targets}
    for c in ran:
        counts[(c["export"], c["target"])][1] += 1
        counts[(c["export"], c["target"])][0] += c["status"] == "passed"
    total_cells = sum(1 for m in models for e in exports for t in targets
                      if manifest["models"].get(m, {}).get("exports", {}).get(e, {}).get("ok"))
    vers = versions()
    results = {"runs": runs, "updated": dt.datetime.now(dt.timezone.utc).isoformat(
                   timespec="seconds"), "versions": vers,
               "zoo_init": manifest.get("init"), "targets": targets, "exports": exports,
               "cells": cells}
    tmp = zoo / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(zoo / "results.json")

    L: list[str] = []
    w = L.append
    w("# Model zoo results\n")
    w("Real `transformers` architectures built from their config classes with small random "
      f"weights (init: `{manifest.get('init')}`; no downloads), each exported three ways "
      "(`ts17`: legacy TorchScript exporter, opset 17, dynamic batch/sequence axes on text "
      "inputs; `dynamo`: `torch.onnx.export(dynamo=True)` defaults, static shapes, weights in "
      "external data; `pt2`: `torch.export.save`), then converted and validated by the mtconvert "
      "CLI, one subprocess per model x export x target, on the example inputs (`--inputs`). "
      "Generated by `benchmarks/zoo/run_zoo.py`; the zoo by `benchmarks/zoo/build_zoo.py` "
      "(architectures and sizes: `benchmarks/zoo/models.py`).\n")
    for i, r in enumerate(runs):
        w(f"- {'Command' if i == 0 else 'Then'}: `{r['command']}` (started {r['started']})")
    w(f"- Zoo built with: `{manifest.get('command')}` ({manifest.get('created')})"
      + "".join(f", then `{c}`" for c in manifest.get("later", [])))
    w(f"- Page updated {results['updated']}")
    w(f"- Cells finished: {len(ran)} of {total_cells} runnable "
      f"({len(models)} models x {len(exports)} exports x {len(targets)} targets, minus exports "
      "that failed); `·` = not run yet")
    opsets = sorted({r.get("opset") for m in manifest["models"].values()
                     for k, r in m.get("exports", {}).items() if k == "dynamo" and r.get("opset")})
    if opsets:
        w(f"- The dynamo exporter's default opset here: {', '.join(map(str, opsets))}")
    w("- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    w(f"- mtconvert source: {git_state()}")
    w("- Machine: 2 shared CPU cores, Linux; Core ML is checked by mtconvert's `mil-reference` "
      "interpreter (no Mac)\n")

    w("## Pass counts (passed / finished)\n")
    w("| export | " + " | ".join(targets) + " | all |")
    w("|---|" + "---|" * (len(targets) + 1))
    for e in exports:
        row = [f"{counts[(e, t)][0]}/{counts[(e, t)][1]}" for t in targets]
        tot = [sum(counts[(e, t)][i] for t in targets) for i in (0, 1)]
        w(f"| {e} | " + " | ".join(row) + f" | {tot[0]}/{tot[1]} |")
    tt = [[sum(counts[(e, t)][i] for e in exports) for i in (0, 1)] for t in targets]
    w("| all | " + " | ".join(f"{a}/{b}" for a, b in tt) + " | "
      f"{sum(a for a, _ in tt)}/{sum(b for _, b in tt)} |\n")

    w("## The zoo\n")
    w("| model | family | class | params | ts17 | dynamo | pt2 |")
    w("|---|---|---|---|---|---|---|")
    for m in models:
        e = manifest["models"].get(m, {})
        ex = e.get("exports", {})
        def b(k: str) -> str:
            r = ex.get(k)
            if not r:
                return "-"
            if not r.get("ok"):
                return "**export failed**"
            d = r.get("max_abs_vs_eager")
            return f"ok ({d:.0e})" if d is not None else "ok (unchecked)"
        w(f"| {m} | {e.get('family', '-')} | {e.get('hf_class', e.get('error', '-'))} | "
          f"{e.get('parameters', 0):,} | {b('ts17')} | {b('dynamo')} | {b('pt2')} |")
    w("\nIn brackets: the export's max abs difference from PyTorch eager on the example inputs "
      "(onnxruntime for ONNX, `torch.export.load` for .pt2).\n")
    fails = [(m, k, r) for m in models
             for k, r in manifest["models"].get(m, {}).get("exports", {}).items()
             if not r.get("ok")]
    if fails:
        w("Export failures:\n")
        for m, k, r in fails:
            w(f"- {m} / {k}: {one_line(r.get('error'), 400)}")
        w("")

    w("## Results\n")
    w("Each cell: status, then the worst output's max abs error / cosine against the source "
      "(fp32 profile: atol 1e-4 + rtol 1e-4, cosine >= 0.99999, SNR >= 100 dB).\n")
    w("| model | export | " + " | ".join(targets) + " |")
    w("|---|---|" + "---|" * len(targets))
    for m in models:
        for e in exports:
            w(f"| {m} | {e} | " + " | ".join(fmt_cell(by.get((m, e, t))) for t in targets) + " |")
    w("")

    w("## Why cells failed\n")
    bad = [c for c in ran if c["status"] != "passed"]
    if not bad:
        w("No failures so far.\n")
    for t in targets:
        tb = [c for c in bad if c["target"] == t]
        if not tb:
            continue
        w(f"### {t}\n")
        common = collections.Counter(reason_key(c.get("reason") or "") for c in tb)
        w("Most common reasons (numbers and paths blurred):\n")
        for r, n in common.most_common(6):
            w(f"- {n} x `{r}`")
        w("")
        for c in tb:
            extra = f" First divergence: {c['first_divergence']}." if c.get("first_divergence") \
                else ""
            w(f"- **{c['model']} / {c['export']}**: {c['status']} — "
              f"{one_line(c.get('reason'), 300) or '(no reason given)'}{extra}")
        w("")
    crashed = [c for c in ran if c.get("internal_error")]
    if crashed:
        w("## CLI internal errors after the report was written\n")
        w("These cells' report JSON is complete (their status above is the report's), but the "
          "CLI then exited 4 (internal error); the last line of its stderr:\n")
        for c in crashed:
            w(f"- {c['model']} / {c['export']} / {c['target']}: {c['internal_error']}")
        w("")
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmpd = doc.with_suffix(".md.tmp")
    tmpd.write_text("\n".join(L) + "\n")
    tmpd.replace(doc)
    return {"counts": counts, "finished": len(ran), "total": total_cells}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", default="build/zoo")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS))
    ap.add_argument("--exports", default="ts17,dynamo,pt2")
    ap.add_argument("--only", default="")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=600, help="mtconvert --timeout per step")
    ap.add_argument("--force", action="store_true", help="run cells that already have a report")
    ap.add_argument("--doc", default="docs/zoo.md")
    ap.add_argument("--no-run", action="store_true", help="only rewrite results.json and the page")
    ap.add_argument("--mtconvert", default=str(REPO / ".venv" / "bin" / "mtconvert"))
    args = ap.parse_args()

    zoo = Path(args.zoo).resolve()
    manifest = json.loads((zoo / "manifest.json").read_text())
    targets = [t for t in args.targets.split(",") if t]
    exports = [e for e in args.exports.split(",") if e]
    bad = [e for e in exports if e not in EXPORT_FILES]
    if bad:
        ap.error(f"unknown export(s) {bad}; known: {list(EXPORT_FILES)}")
    models = [m for m in args.only.split(",") if m] or list(manifest["models"])
    missing = [m for m in models if m not in manifest["models"]]
    if missing:
        ap.error(f"not in the zoo's manifest: {', '.join(missing)}")
    doc = Path(args.doc)
    doc = doc if doc.is_absolute() else REPO / doc
    cmdline = " ".join([".venv/bin/python", "benchmarks/zoo/run_zoo.py", *sys.argv[1:]])
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    prev = {}
    if (zoo / "results.json").is_file():
        prev = json.loads((zoo / "results.json").read_text())
    runs = prev.get("runs") or ([{"command": prev["command"], "started": prev["started"]}]
                                if prev.get("command") else [])
    if not args.no_run:
        runs = runs + [{"command": cmdline, "started": started}]
    # the page covers the whole zoo and every cell on disk; --only/--exports/--targets only
    # choose what runs now
    disk = on_disk(zoo)
    if args.no_run and disk:  # only re-render: what has run
        exports = [e for e in EXPORT_FILES if any(d[0] == e for d in disk)]
        targets = [t for t in ALL_TARGETS if any(d[1] == t for d in disk)]
    page_models = list(manifest["models"])
    page_exports = [e for e in EXPORT_FILES if e in exports or any(d[0] == e for d in disk)]
    page_targets = [t for t in ALL_TARGETS if t in targets or any(d[1] == t for d in disk)] \
        + [t for t in targets if t not in ALL_TARGETS]
    page = (zoo, manifest, page_models, page_exports, page_targets, doc, runs)

    todo = []
    for m in models:
        for e in exports:
            if not manifest["models"][m].get("exports", {}).get(e, {}).get("ok"):
                continue
            for t in targets:
                p = cell_paths(zoo, m, e, t)
                if not args.force and p["report"].is_file():
                    continue
                if not args.force and p["cell"].is_file() and \
                        json.loads(p["cell"].read_text()).get("timed_out"):
                    continue
                todo.append((m, e, t, p))
    if not args.no_run:
        print(f"{len(todo)} cells to run ({len(models)} models, exports {exports}, targets "
              f"{targets})", flush=True)

    def one(item: tuple) -> None:
        m, e, t, p = item
        cell = run_cell(args.mtconvert, p, t, args.timeout)
        with LOCK:
            c = read_cell(zoo, manifest, m, e, t) or {
                "status": "retry-later", "reason": cell.get("transient")}
            extra = "" if c.get("status") == "passed" else f"  {one_line(c.get('reason'), 160)}"
            print(f"{dt.datetime.now(dt.timezone.utc):%H:%M:%S} {m:16} {e:6} {t:11} "
                  f"{c.get('status', '?'):8} exit={cell['exit_code']} {cell['seconds']:6.1f}s"
                  f"  {fmt_cell(c) if c.get('max_abs') is not None else ''}{extra}", flush=True)
            write_outputs(*page)

    if not args.no_run:
        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for f in [pool.submit(one, item) for item in todo]:
                f.result()
    summary = write_outputs(*page)
    counts = summary["counts"]
    targets, exports = page_targets, page_exports
    print(f"\n{summary['finished']}/{summary['total']} cells finished; passed/finished:")
    for t in targets:
        a = sum(counts[(e, t)][0] for e in exports)
        b = sum(counts[(e, t)][1] for e in exports)
        print(f"  target {t:12} {a}/{b}")
    for e in exports:
        a = sum(counts[(e, t)][0] for t in targets)
        b = sum(counts[(e, t)][1] for t in targets)
        print(f"  export {e:12} {a}/{b}")
    print(f"wrote {doc} and {zoo / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
