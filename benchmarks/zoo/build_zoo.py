"""Build the model zoo: every architecture of models.py exported three ways.

    .venv/bin/python benchmarks/zoo/build_zoo.py [--out build/zoo] [--only NAME,...]
                                                 [--init hf|trained]

Per model NAME, in OUT/NAME/:
  NAME.ts17.onnx      torch.onnx.export(..., dynamo=False, opset_version=17), dynamic axes
                      batch/sequence on text inputs (as users of the legacy exporter do);
  NAME.dynamo.onnx    torch.onnx.export(..., dynamo=True) with the exporter's defaults (its own
                      opset, static shapes) and external_data=True: weights in
                      NAME.dynamo.onnx.data beside it;
  NAME.pt2            torch.export.save(torch.export.export(module, args)) (static shapes);
  inputs.npz          the example inputs keyed by input name (mtconvert --inputs);
  NAME.build.log      everything the exporters printed.
OUT/manifest.json: per model what it is, its inputs/output, and per export whether it built
(file, bytes, seconds, max abs difference against PyTorch eager on inputs.npz, checked with
onnxruntime / torch.export.load) or why not (the exporter's one-line reason). A model that
cannot be exported one way is recorded, not fatal. With --only, other models' entries in an
existing manifest are kept.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

EXPORTS = ("ts17", "dynamo", "pt2")


def one_line(exc: BaseException) -> str:
    """The exporter's reason in one line: its own first line, then the root cause's (torch.onnx
    wraps the error that stopped it: 'Failed to decompose ...' <- ValueError: Cannot view ...)."""
    head = _first_line(exc)
    root = exc
    for _ in range(20):
        nxt = root.__cause__ or root.__context__
        if nxt is None:
            break
        root = nxt
    if root is not exc:
        head = f"{head} <- {_first_line(root)}"
    return head[:500]


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    # torch.onnx's dynamo errors open with a generic line; the cause follows
    generic = ("Failed to export the model with torch.export", "Failed to convert the exported")
    pick = lines[0]
    if any(pick.startswith(g) for g in generic):
        for ln in lines[1:]:
            if ln.startswith(("torch._dynamo", "torch.fx", "RuntimeError", "Error", "Unsupported",
                              "Dynamic", "Constraints", "GuardOnDataDependent", "TypeError",
                              "ValueError", "AssertionError", "KeyError", "NotImplementedError",
                              "torch.onnx", "DispatchError", "ConversionError")):
                pick = f"{lines[0]} {ln}"
                break
    return f"{type(exc).__name__}: {pick}"[:400]


def _ort_max_abs(path: Path, feeds: dict[str, np.ndarray], ref: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, {k: feeds[k] for k in names})[0]
    if out.shape != ref.shape:
        raise ValueError(f"onnxruntime output shape {out.shape} != eager {ref.shape}")
    return float(np.abs(out.astype(np.float64) - ref).max())


def export_ts17(z, path: Path) -> None:
    import torch

    torch.onnx.export(z.module, z.args, str(path), input_names=z.input_names,
                      output_names=[z.output_name], dynamic_axes=z.dynamic_axes or None,
                      opset_version=17, dynamo=False, do_constant_folding=True)


def export_dynamo(z, path: Path) -> None:
    import torch

    prog = torch.onnx.export(z.module, z.args, str(path), input_names=z.input_names,
                             output_names=[z.output_name], dynamo=True, external_data=True)
    if prog is None or not path.is_file():
        raise RuntimeError("the exporter wrote no file")


def export_pt2(z, path: Path) -> None:
    import torch

    ep = torch.export.export(z.module, z.args)
    torch.export.save(ep, str(path))


def check_pt2(path: Path, z, ref: np.ndarray) -> float:
    import torch

    mod = torch.export.load(str(path)).module()
    with torch.no_grad():
        out = mod(*z.args)
    return float(np.abs(out.detach().numpy().astype(np.float64) - ref).max())


def build_one(name: str, out: Path, init: str) -> dict:
    import torch

    from models import build

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    entry: dict = {"name": name, "init": init}
    t0 = time.monotonic()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            z = build(name, init)
        except Exception as exc:  # noqa: BLE001  recorded
            entry["error"] = f"build failed: {one_line(exc)}"
            log.write(traceback.format_exc())
            (folder / f"{name}.build.log").write_text(log.getvalue())
            return entry
        with torch.no_grad():
            ref = z.module(*z.args).detach().numpy().astype(np.float64)
        feeds = {k: v.numpy() for k, v in z.inputs.items()}
        np.savez(folder / "inputs.npz", **feeds)
        entry |= {"family": z.family, "hf_class": z.hf_class, "notes": z.notes,
                  "parameters": int(sum(p.numel() for p in z.module.parameters())),
                  "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                             for k, v in feeds.items()},
                  "output": {"name": z.output_name, "shape": list(ref.shape)},
                  "dynamic_axes_ts17": {k: {str(a): n for a, n in ax.items()}
                                        for k, ax in z.dynamic_axes.items()},
                  "exports": {}}
        for export, fn, fname in (("ts17", export_ts17, f"{name}.ts17.onnx"),
                                  ("dynamo", export_dynamo, f"{name}.dynamo.onnx"),
                                  ("pt2", export_pt2, f"{name}.pt2")):
            path = folder / fname
            for stale in (path, path.with_name(path.name + ".data")):
                stale.unlink(missing_ok=True)
            rec: dict = {"file": fname}
            log.write(f"\n===== {export} =====\n")
            t1 = time.monotonic()
            try:
                torch.manual_seed(0)
                fn(z, path)
                rec["ok"] = True
            except Exception as exc:  # noqa: BLE001  one export failing is a result
                rec |= {"ok": False, "error": one_line(exc)}
                log.write(traceback.format_exc())
            rec["seconds"] = round(time.monotonic() - t1, 1)
            if rec["ok"]:
                files = [path] + ([path.with_name(path.name + ".data")]
                                  if path.with_name(path.name + ".data").exists() else [])
                rec["bytes"] = sum(f.stat().st_size for f in files)
                if len(files) > 1:
                    rec["external_data"] = files[1].name
                try:
                    rec["max_abs_vs_eager"] = (check_pt2(path, z, ref) if export == "pt2"
                                               else _ort_max_abs(path, feeds, ref))
                except Exception as exc:  # noqa: BLE001
                    rec["check_error"] = one_line(exc)
                    log.write(traceback.format_exc())
                if export != "pt2":
                    import onnx
                    m = onnx.load(str(path), load_external_data=False)
                    rec["opset"] = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
                    rec["nodes"] = len(m.graph.node)
            entry["exports"][export] = rec
    entry["seconds"] = round(time.monotonic() - t0, 1)
    (folder / f"{name}.build.log").write_text(log.getvalue())
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="build/zoo")
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--init", choices=("hf", "trained"), default="hf")
    args = ap.parse_args()

    import onnx
    import onnxruntime
    import torch
    import transformers

    from models import ARCHITECTURES

    names = [n for n in args.only.split(",") if n] or list(ARCHITECTURES)
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(ARCHITECTURES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
    if manifest.get("init") not in (None, args.init):
        manifest = {}  # another weight regime: start over
    models = manifest.get("models", {})
    command = " ".join([".venv/bin/python", "benchmarks/zoo/build_zoo.py", *sys.argv[1:]])
    later = manifest.get("later", []) + [command] if args.only else []
    torch.set_num_threads(2)
    for name in names:
        entry = build_one(name, out, args.init)
        models[name] = entry
        status = " ".join(
            f"{e}={'ok' if r.get('ok') else 'FAILED'}"
            + (f"({r['max_abs_vs_eager']:.1e})" if r.get("max_abs_vs_eager") is not None else "")
            for e, r in entry.get("exports", {}).items())
        print(f"{name:16} {entry.get('seconds', 0):6.1f}s  {status or entry.get('error')}",
              flush=True)
        for e, r in entry.get("exports", {}).items():
            if not r.get("ok"):
                print(f"    {e}: {r['error']}", flush=True)
            elif r.get("check_error"):
                print(f"    {e} check: {r['check_error']}", flush=True)
        manifest = {"init": args.init, "created": dt.datetime.now(dt.timezone.utc).isoformat(
                        timespec="seconds"),
                    "command": command if not args.only else manifest.get("command", command),
                    "later": later,
                    "versions": {"torch": torch.__version__,
                                 "transformers": transformers.__version__,
                                 "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
                    "models": {k: models[k] for k in ARCHITECTURES if k in models}}
        tmp = mpath.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(mpath)
    built = {e: sum(1 for m in models.values() if m.get("exports", {}).get(e, {}).get("ok"))
             for e in EXPORTS}
    print(f"{len(models)} models; built: " + ", ".join(f"{e} {n}" for e, n in built.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
