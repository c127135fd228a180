"""Options from mtconvert.toml / [tool.mtconvert]: the same spec as the CLI, overridden by it,
unknown keys a one-line error (exit 2)."""
import json
import subprocess
import sys
from pathlib import Path

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")


def run(*args, cwd):
    return subprocess.run([MTCONVERT, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_mtconvert_toml_sets_options_and_the_command_line_overrides(tiny_onnx, tmp_path):
    (tmp_path / "mtconvert.toml").write_text(
        'precision = "int8"\niterations = 4\nwarmup = 0\nreport_json = "from-config.json"\n'
        'input_shapes = {input_ids = "1x12", attention_mask = "1x12"}\n'
        '[onnx-mobile]\n')
    proc = run(tiny_onnx, "--to", "onnx-mobile", "--out", "o", "--iterations", "2", "-q",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "from-config.json").read_text())
    assert report["settings"]["precision"] == "int8"  # from the file
    assert report["settings"]["iterations"] == 2  # the command line wins
    assert report["source"]["input_shapes"]["input_ids"] == [1, 12]


def test_pyproject_tool_table_and_backend_tables(tiny_onnx, tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n[tool.mtconvert]\nwarmup = 0\niterations = 2\n'
        'report-json = "r.json"\n[tool.mtconvert.tflite]\nallow-flex = true\n')
    proc = run(tiny_onnx, "--to", "onnx-mobile", "--out", "o", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["iterations"] == 2


def test_unknown_keys_are_one_line_errors(tiny_onnx, tmp_path):
    cfg = tmp_path / "other.toml"
    for text, needle in [('precison = "fp16"\n', "unknown key 'precison'"),
                         ('[ncnn]\nallow_flex = true\n', "[ncnn] has no option 'allow_flex'"),
                         ('precision = "fp8"\n', "fp8"), ("not toml = = 1\n", "config")]:
        cfg.write_text(text)
        proc = run(tiny_onnx, "--to", "onnx-mobile", "--out", "o", "--config", cfg,
                   cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
        assert not (tmp_path / "o").exists()
