"""The real `mtconvert` command in a subprocess: exit codes, one-line errors, start-up cost."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
HEAVY = ("torch", "tensorflow", "onnx2tf", "coremltools", "ncnn", "onnxruntime", "rich", "numpy")


def run(*args, cwd=None):
    return subprocess.run([MTCONVERT, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("argv", [["--help"], ["backends"]])
def test_startup_imports_no_toolchain(argv):
    code = ("import sys, json\nfrom mtconvert.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    allowed = {"rich"} if argv == ["backends"] else set()  # backends prints a rich table
    assert set(loaded) <= allowed, f"{argv} imported {loaded}"


def test_backends_lists_onnx_mobile_as_json():
    proc = run("backends", "--json")
    assert proc.returncode == 0
    row = {r["name"]: r for r in json.loads(proc.stdout)}["onnx-mobile"]
    assert row["can_convert"] and row["can_run"] and "ort" in row["aliases"]
    assert "onnxruntime" in row["versions"]


def _bad_files(tmp: Path, tiny: Path) -> dict[str, Path]:
    data = tiny.read_bytes()
    files = {"empty.onnx": b"", "truncated.onnx": data[: len(data) // 3],
             "corrupt.onnx": bytes(b ^ 0x5A for b in data[:200]) + data[200:],
             "text.onnx": b"hello, I am not a model\n", "model.txt": data}
    out = {}
    for name, content in files.items():
        (tmp / name).write_bytes(content)
        out[name] = tmp / name
    (tmp / "adir.onnx").mkdir()
    out["adir.onnx"] = tmp / "adir.onnx"
    out["missing.onnx"] = tmp / "missing.onnx"
    return out


@pytest.mark.parametrize("case,needle", [
    ("empty.onnx", "empty"), ("truncated.onnx", "ONNX"), ("corrupt.onnx", "ONNX"),
    ("text.onnx", "ONNX"), ("model.txt", "unsupported model file type"),
    ("adir.onnx", "directory"), ("missing.onnx", "not found")])
def test_bad_model_files_exit_2_one_line(case, needle, tmp_path, tiny_onnx):
    path = _bad_files(tmp_path, tiny_onnx)[case]
    out = tmp_path / "out"
    proc = run(path, "--to", "onnx-mobile", "--out", out)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtconvert: error:") and needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("args,needle", [
    (["--to", "tflitee"], "unknown target 'tflitee'; known targets:"),
    (["--to", ","], "at least one target"),
    (["--input-shape", "input_ids:1x8"], "malformed --input-shape"),
    (["--input-shape", "nope=1x8"], "unknown input nope"),
    (["--input-shape", "input_ids=1x2x3"], "rank"),
    (["--precision", "fp8"], "fp8"),
    (["--atol", "abc"], "not a number"),
    (["--threads", "0"], "threads"),
    (["--inputs", "missing.npz"], "inputs file not found"),
])
def test_bad_options_exit_2_one_line(args, needle, tmp_path, tiny_onnx):
    proc = run(tiny_onnx, "--out", tmp_path / "out", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_uncomputable_inputs_exit_2(tmp_path, tiny_onnx):
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    proc = run(tiny_onnx, "--inputs", tmp_path / "bad.npz", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "not a readable .npz" in proc.stderr


def test_debug_shows_traceback(tmp_path):
    proc = run(tmp_path / "missing.onnx", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


@pytest.mark.slow
def test_convert_real_onnx_mobile_writes_report(tmp_path, tiny_onnx):
    out, rep = tmp_path / "out", tmp_path / "r" / "report.json"
    proc = run("convert", tiny_onnx, "--to", "ort", "--out", out, "--report-json", rep,
               "--iterations", "5", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = json.loads(rep.read_text())
    t = d["targets"][0]
    assert d["ok"] and t["name"] == "onnx-mobile" and t["status"] == "passed"
    assert {Path(a["path"]).name for a in t["artifacts"]} == {
        "tiny.ort", "tiny.required_operators.config"}
    assert all(Path(a["path"]).is_file() for a in t["artifacts"])
    assert "PASSED" in proc.stdout and "onnx-mobile" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "tiny.onnx-mobile.log", "tiny.ort", "tiny.required_operators.config"]
