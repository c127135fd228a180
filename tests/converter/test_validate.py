"""`mtconvert validate`: artifacts built elsewhere, checked against the source."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mtconvert
from mtconvert.errors import ModelLoadError, UsageError
from tests.models import perturb, tiny_encoder

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """.ort and .tflite of the tiny encoder, plus the .ort of a different model."""
    folder = tmp_path_factory.mktemp("built")
    src = tiny_encoder(folder / "tiny.onnx")
    report = mtconvert.convert(src, targets=["onnx-mobile", "tflite"], out_dir=folder / "out",
                               iterations=1, warmup=0, input_shapes={"input_ids": "1x12"})
    assert report.ok
    other = tiny_encoder(folder / "other.onnx", seed=1)
    mtconvert.convert(other, targets=["onnx-mobile"], out_dir=folder / "other", iterations=1)
    return src, folder / "out", folder / "other" / "other.ort"


def test_good_artifacts_pass_with_their_fixed_shapes(built):
    src, out, _ = built
    report = mtconvert.validate(src, [out / "tiny.tflite", out / "tiny.ort"], iterations=2)
    assert report.ok and report.settings["mode"] == "validate"
    assert [t.name for t in report.targets.values()] == ["tflite", "onnx-mobile"]
    assert report.targets["tflite"].input_shapes == {"input_ids": [1, 12],
                                                     "attention_mask": [1, 12]}
    assert all(t.conversion is None for t in report.targets.values())


def test_wrong_artifact_fails(built):
    src, _, other = built
    report = mtconvert.validate(src, [other], iterations=1)
    t = report.targets["onnx-mobile"]
    assert t.status == "failed" and "logits" in t.reason and report.exit_code == 1


def test_same_target_twice_gets_distinct_names(built):
    src, out, other = built
    report = mtconvert.validate(src, [out / "tiny.ort", other], iterations=1)
    assert list(report.targets) == ["onnx-mobile", "onnx-mobile:other.ort"]


def test_artifacts_of_one_file_name_in_other_folders_each_get_a_report(built, tmp_path):
    """Three files named alike (one build, two copies elsewhere): three reports, none lost."""
    src, out, _ = built
    copies = [tmp_path / d / "tiny.ort" for d in ("a", "b")]
    for copy in copies:
        copy.parent.mkdir()
        copy.write_bytes((out / "tiny.ort").read_bytes())
    report = mtconvert.validate(src, [out / "tiny.ort", *copies], iterations=1)
    assert list(report.targets) == ["onnx-mobile", "onnx-mobile:tiny.ort",
                                    f"onnx-mobile:{copies[1]}"]
    assert all(t.status == "passed" for t in report.targets.values())


def test_bad_requests(built, tmp_path):
    src, out, _ = built
    with pytest.raises(UsageError, match="fixed to"):
        mtconvert.validate(src, [out / "tiny.tflite"], input_shapes={"input_ids": "1x5"})
    with pytest.raises(ModelLoadError, match="artifact not found"):
        mtconvert.validate(src, [tmp_path / "nope.tflite"])
    (tmp_path / "m.param").write_text("7767517")
    with pytest.raises(ModelLoadError, match="needs its weights m.bin beside it"):
        mtconvert.validate(src, [tmp_path / "m.param"])
    (tmp_path / "m.bin").write_bytes(b"")
    (tmp_path / "m.param").write_text("not a param file\n")
    with pytest.raises(ModelLoadError, match="m.param is not an ncnn .param file"):
        mtconvert.validate(src, [tmp_path / "m.param"])
    (tmp_path / "m.xyz").write_text("")
    with pytest.raises(UsageError, match="no target validates .xyz"):
        mtconvert.validate(src, [tmp_path / "m.xyz"])


def test_cli_validate_exit_codes(built, tmp_path):
    src, out, other = built
    ok = subprocess.run([MTCONVERT, "validate", str(src), str(out / "tiny.ort"), "-q",
                         "--report-json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert ok.returncode == 0 and (tmp_path / "r.json").is_file()
    bad = subprocess.run([MTCONVERT, "validate", str(src), str(other), "-q"],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    usage = subprocess.run([MTCONVERT, "validate", str(src)], capture_output=True, text=True)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


def test_failure_is_localized_from_tflite_tensors(built, tmp_path):
    src, out, _ = built
    node = perturb(src, tmp_path / "shifted.onnx", "MatMul")
    t = mtconvert.validate(tmp_path / "shifted.onnx", [out / "tiny.tflite"],
                           iterations=1).targets["tflite"]
    assert t.status == "failed"
    first = t.diagnostics["first_divergence"]
    assert first["node"] == node and t.diagnostics["exact"]


def test_validate_from_report_and_side_files(tiny_onnx, tmp_path):
    """The artifacts a convert report lists, by role; side files on the command line are
    validated with their artifact, not refused."""
    mtc = str(Path(sys.executable).parent / "mtconvert")
    out, report = tmp_path / "o", tmp_path / "r.json"
    subprocess.run([mtc, str(tiny_onnx), "--to", "onnx-mobile", "--out", str(out),
                    "--report-json", str(report), "-q", "--iterations", "2"], check=True,
                   capture_output=True)
    entries = json.loads(report.read_text())["targets"][0]["artifacts"]
    roles = {Path(a["path"]).suffix: a["role"] for a in entries}
    assert roles == {".ort": "artifact", ".config": "sidecar"}
    proc = subprocess.run([mtc, "validate", str(tiny_onnx), "--from-report", str(report),
                           "--report-json", str(tmp_path / "v.json"), "-q",
                           "--iterations", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    v = json.loads((tmp_path / "v.json").read_text())
    assert [t["name"] for t in v["targets"]] == ["onnx-mobile"]
    files = [a["path"] for a in entries]
    proc = subprocess.run([mtc, "validate", str(tiny_onnx), *files, "--report-json",
                           str(tmp_path / "w.json"), "-q", "--iterations", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    w = json.loads((tmp_path / "w.json").read_text())
    assert w["settings"]["side_files_skipped"] == [Path(f).name for f in files
                                                   if f.endswith(".config")]
