"""Report formats: JUnit XML read back with a JUnit consumer library (junitparser, which CI
test-report actions use to read such files), Markdown for pull-request comments, ``--json`` on
stdout, and the deployment snippets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from junitparser import JUnitXml

import mtconvert
from mtconvert.backends import snippets as sn
from mtconvert.backends.base import Artifact, TensorSpec
from mtconvert.registry import Registry
from mtconvert.render import markdown, render
from mtconvert.report import (ArtifactFile, Conversion, Latency, Numerics, Report, SourceInfo,
                              TargetMap, TargetReport)
from tests.fake_backend import (FakeBackend, FixedShapeFakeBackend, OtherFakeBackend,
                                TracedFakeBackend)
from tests.models import tiny_encoder

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _registry() -> Registry:
    reg = Registry()
    for cls in (FakeBackend, OtherFakeBackend, FixedShapeFakeBackend, TracedFakeBackend):
        reg.register(cls)
    return reg


def _run(tmp: Path, targets: list[str], **kw) -> Report:
    model = tmp / "tiny.onnx"
    if not model.exists():
        tiny_encoder(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTCONVERT_CACHE_DIR", str(tmp / "cache"))
        return mtconvert.convert(model, targets=targets, out_dir=tmp / "out",
                                 registry=_registry(), iterations=2, warmup=0, **kw)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Report:
    """One run, a target per outcome: fake2 passes, fake-traced fails its numerics, fake fails
    its lint, fake-fixed crashes; a sweep adds sequence length 8."""
    return _run(tmp_path_factory.mktemp("mixed"), ["fake2", "fake-traced", "fake", "fake-fixed"],
                seq_lens=(32, 8), extra={"fake-traced": {"noise": 0.05},
                                         "fake": {"lint_error": True},
                                         "fake-fixed": {"crash": True}})


def _junit(report: Report, tmp: Path) -> JUnitXml:
    path = tmp / "junit.xml"
    render("junit", report, path)
    return JUnitXml.fromfile(str(path))


def _cases(xml: JUnitXml, suite_name: str) -> dict:
    suite = next(s for s in xml if s.name == suite_name)
    return {c.name: c for c in suite}


def _agrees(xml: JUnitXml, exit_code: int) -> bool:
    xml.update_statistics()  # recount from the testcases themselves
    if xml.errors:
        return exit_code == 3
    return exit_code == (1 if xml.failures else 0)


# --- JUnit ------------------------------------------------------------------------------------

def test_junit_testcases_per_target_and_check(mixed, tmp_path):
    assert [t.status for t in mixed.targets.values()] == ["passed", "failed", "failed", "error"]
    xml = _junit(mixed, tmp_path)
    assert [s.name for s in xml] == ["fake2 fp32", "fake-traced fp32", "fake fp32",
                                     "fake-fixed fp32"]

    ok = _cases(xml, "fake2 fp32")
    assert list(ok) == ["conversion", "mobile-compatibility", "numerics: logits",
                        "numerics at input_ids=1x8, attention_mask=1x8", "latency", "verdict"]
    assert all(c.is_passed for c in ok.values())

    noisy = _cases(xml, "fake-traced fp32")
    assert noisy["conversion"].is_passed and noisy["mobile-compatibility"].is_passed
    message = noisy["numerics: logits"].result[0].message
    assert noisy["numerics: logits"].is_failure
    assert "max abs 0.05" in message and "cosine" in message and "atol 0.0001" in message
    assert noisy["numerics at input_ids=1x8, attention_mask=1x8"].is_failure  # noise there too
    assert noisy["latency"].is_passed and noisy["verdict"].is_failure

    lint = _cases(xml, "fake fp32")
    assert lint["mobile-compatibility"].is_failure
    assert "FakeOp" in lint["mobile-compatibility"].result[0].message
    assert lint["numerics"].is_skipped and lint["latency"].is_skipped
    assert lint["verdict"].is_failure

    crash = _cases(xml, "fake-fixed fp32")
    assert crash["conversion"].is_passed and crash["numerics"].is_error
    assert "SIGSEGV" in crash["numerics"].result[0].message
    assert crash["latency"].is_skipped and crash["verdict"].is_error

    assert mixed.exit_code == 3 and xml.errors == 2 and _agrees(xml, mixed.exit_code)


def test_junit_skipped_target_is_skipped_checks_and_a_failed_verdict(tmp_path):
    report = _run(tmp_path, ["fake"], precision="int8")  # fake has no int8
    xml = _junit(report, tmp_path)
    cases = _cases(xml, "fake int8")
    assert all(cases[n].is_skipped for n in ("conversion", "mobile-compatibility", "numerics",
                                             "latency"))
    assert cases["verdict"].is_failure  # nothing unproven passes: exit code 1
    assert report.exit_code == 1 and (xml.failures, xml.errors) == (1, 0)
    assert _agrees(xml, report.exit_code)


def test_junit_conversion_error(tmp_path):
    report = _run(tmp_path, ["fake", "fake2"], extra={"fake": {"convert_error": True}})
    xml = _junit(report, tmp_path)
    cases = _cases(xml, "fake fp32")
    assert cases["conversion"].is_error
    assert "the fake tool failed" in cases["conversion"].result[0].message
    assert cases["numerics"].is_skipped and cases["verdict"].is_error
    assert all(c.is_passed for c in _cases(xml, "fake2 fp32").values())
    assert report.exit_code == 3 and _agrees(xml, report.exit_code)


def _target(name: str, status: str, **kw) -> TargetReport:
    if status in ("passed", "failed"):
        ok = status == "passed"
        kw.setdefault("numerics", Numerics(ok, "rt", {"output": "y", "max_abs": 0.0 if ok else 1.0,
                                                      "cosine": 1.0 if ok else 0.5},
                                           {"y": {"passed": ok, "reason": None if ok else "bad",
                                                  "max_abs": 0.0 if ok else 1.0,
                                                  "cosine": 1.0 if ok else 0.5,
                                                  "tolerance": {"atol": 1e-4}}}))
        kw.setdefault("latency", Latency(1.0, 1.1, 1.2, 1.05, 2, 0, 1))
        kw.setdefault("conversion", Conversion(0.5, ("step",)))
        kw.setdefault("artifacts", (ArtifactFile(f"/out/m.{name}", 2048),))
    return TargetReport(name, status, None if status == "passed" else f"{status} because",
                        **kw)


def _report(*targets: TargetReport, settings=None) -> Report:
    src = SourceInfo("/models/m.onnx", "onnx", "ab" * 32, ({"name": "x"},), ({"name": "y"},),
                     {"x": [1, 4]})
    return Report(src, None, TargetMap(list(targets)), settings=settings or {})


@pytest.mark.parametrize("statuses", [(), ("passed",), ("failed",), ("skipped",), ("error",),
                                      ("passed", "skipped"), ("passed", "failed", "error"),
                                      ("skipped", "failed"), ("passed", "passed")])
@pytest.mark.parametrize("mode", ["convert", "validate"])
def test_junit_failures_and_errors_agree_with_the_exit_code(statuses, mode, tmp_path):
    report = _report(*(_target(f"t{i}", s) for i, s in enumerate(statuses)),
                     settings={} if mode == "convert" else {"mode": mode})
    xml = _junit(report, tmp_path)
    assert _agrees(xml, report.exit_code), (statuses, report.exit_code, xml.failures, xml.errors)


def test_junit_is_valid_xml_whatever_the_tools_printed(tmp_path):
    bad = "\x1b[31mboom\x1b[0m \x00\x07<&> ünïcode"
    report = _report(TargetReport("t", "error", bad))
    xml = _junit(report, tmp_path)
    message = _cases(xml, "t fp32")["conversion"].result[0].message
    assert message == "boom <&> ünïcode"


def test_junit_accuracy_hook_adds_nothing_without_accuracy_data(mixed, tmp_path):
    xml = _junit(mixed, tmp_path)
    assert not any(c.name.startswith("accuracy") for s in xml for c in s)


# --- Markdown ---------------------------------------------------------------------------------

def test_markdown_table_reasons_and_no_accuracy_column(mixed):
    text = markdown.to_markdown(mixed)
    lines = text.splitlines()
    assert lines[0].startswith("### mtconvert: ❌ FAILED — 1/4 targets passed (exit code 3)")
    header = next(ln for ln in lines if ln.startswith("| target"))
    assert header == "| target | status | worst error | cosine | p50 ms (vs ref) | size |"
    rows = {ln.split(" | ")[0][2:]: ln for ln in lines if ln.startswith("| fake")}
    assert list(rows) == ["fake2 fp32", "fake-traced fp32", "fake fp32", "fake-fixed fp32"]
    assert "✅ passed" in rows["fake2 fp32"] and "❌ failed" in rows["fake-traced fp32"]
    assert "5.00e-02 (`logits`)" in rows["fake-traced fp32"]
    assert "💥 error" in rows["fake-fixed fp32"]
    p50 = mixed.targets["fake2"].latency.p50_ms
    ratio = mixed.targets["fake2"].latency_vs_reference["ratio_p50"]  # timed interleaved
    assert f"{p50:.2f} ({ratio:.2f}x" in rows["fake2 fp32"]
    why = text.split("**Why not passed**")[1]
    assert "fake2" not in why
    for name in ("fake-traced fp32", "fake fp32", "fake-fixed fp32"):
        assert f"**{name}**" in why
    assert "FakeOp" in why and "SIGSEGV" in why
    assert "<details>" not in text  # the fake backend offers no deployment snippet


def test_markdown_snippet_sections_and_accuracy_column(monkeypatch):
    code = "x = 1  # ```not a fence```\n"
    t = _target("tflite", "passed", snippets={"python": code, "kotlin": "val x = 1\n"})
    text = markdown.to_markdown(_report(t, _target("ncnn", "failed")))
    block = text[text.index("<details>"):]
    assert "<summary>tflite fp32: deployment snippets (Kotlin, Python)</summary>" in block
    assert block.index("```kotlin") < block.index("````python")  # a longer fence around ```
    assert "````python\nx = 1  # ```not a fence```\n````" in block
    assert block.count("<details>") == 1 and "</details>" in block
    assert "accuracy" not in text

    monkeypatch.setattr(markdown, "_accuracy", lambda t: "0.91 F1" if t.name == "tflite" else None)
    header = next(ln for ln in markdown.to_markdown(_report(t)).splitlines()
                  if ln.startswith("| target"))
    assert header.endswith("| size | accuracy |")


# --- the report field -------------------------------------------------------------------------

def test_reports_written_before_snippets_still_load(mixed):
    d = json.loads(mixed.to_json())
    for t in d["targets"]:
        del t["snippets"]
    old = Report.from_dict(d)
    assert all(t.snippets == {} for t in old.targets.values())
    with_snippets = _report(_target("t", "passed", snippets={"python": "print(1)\n"}))
    assert Report.from_json(with_snippets.to_json()) == with_snippets


# --- snippets: templates and backends ---------------------------------------------------------

def _ports() -> tuple[list[sn.Port], list[sn.Port]]:
    ins = [sn.Port("in0", "input_ids", (1, 16), "int32", 0),
           sn.Port("in1", "attention_mask", (1, 16), "float32", 1)]
    outs = [sn.Port("out0", "last_hidden_state", (1, 16, 8), "float32", 0,
                    "channels-last: transpose by [0, 2, 1] to the source's layout")]
    return ins, outs


@pytest.mark.parametrize("lang,make", [
    ("kotlin", lambda i, o: sn.kotlin_tflite("m.tflite", i, o)),
    ("python", lambda i, o: sn.python_tflite("m.tflite", i, o)),
    ("kotlin", lambda i, o: sn.kotlin_onnxruntime("m.ort", i, o)),
    ("python", lambda i, o: sn.python_onnxruntime("m.ort", i, o)),
    ("cpp", lambda i, o: sn.cpp_ncnn("m.ncnn.param", "m.ncnn.bin", i, o, True)),
    ("python", lambda i, o: sn.python_ncnn("m.ncnn.param", "m.ncnn.bin", i, o, False)),
    ("swift", lambda i, o: sn.swift_coreml("m.mlpackage", i, o, "iOS16")),
    ("python", lambda i, o: sn.python_coreml("m.mlpackage", i, o)),
])
def test_templates_use_the_artifacts_names_dtypes_and_shapes(lang, make):
    ins, outs = _ports()
    code = make(ins, outs)
    assert "m." in code and "int32" in code.lower() and "16" in code
    for p in (*ins, *outs):
        assert p.name in code or p.source in code
    if lang == "python":
        compile(code, "<snippet>", "exec")  # valid Python
    if "tflite" in code and lang == "python":
        assert ".transpose((0, 2, 1))" in code


def test_identifiers_are_distinct_and_not_reserved():
    assert sn.identifiers(["input_ids", "input-ids", "in", "1x", "net"], camel=True) == [
        "inputIds", "inputIds2", "inValue", "t1x", "netValue"]
    assert sn.identifiers(["output.1", "class"], camel=False) == ["output_1", "class_value"]


def test_ncnn_backend_snippets_follow_its_blobs(tmp_path):
    from mtconvert.backends.ncnn import NcnnBackend

    param = tmp_path / "enc.fp16.ncnn.param"
    art = Artifact("ncnn", param, (param, param.with_suffix(".bin")), precision="fp16",
                   meta={"inputs": [["in0", "input_ids", "int64"], ["in1", "mask", "float32"]],
                         "outputs": [["out0", "logits", [1, 3]]], "mode": "phone-fp16"})
    got = NcnnBackend().snippets(art, [TensorSpec("input_ids", (1, 32), "int64"),
                                       TensorSpec("mask", (1, 32), "int64")],
                                 [TensorSpec("logits", (1, 3), "float32")])
    assert set(got) == {"cpp", "python"}
    cpp = got["cpp"]
    assert '"enc.fp16.ncnn.param"' in cpp and '"enc.fp16.ncnn.bin"' in cpp
    assert 'ex.input("in0", inputIds)' in cpp and "int* inputIdsData" in cpp
    assert "float* maskData" in cpp and 'ex.extract("out0", logits)' in cpp
    assert "use_fp16_storage" not in cpp  # validated with ncnn's fp16 defaults
    compile(got["python"], "<snippet>", "exec")


# --- the CLI: --json, --junit, --markdown on a real onnx-mobile run ---------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, MTCONVERT_CACHE_DIR=str(tmp / "cache"))
    proc = subprocess.run([MTCONVERT, str(FIXTURES / "bert_encoder.onnx"), "--to", "onnx-mobile",
                           "--out", str(tmp / "out"), "--json", "-v", "--iterations", "3",
                           "--junit", str(tmp / "r.xml"), "--markdown", str(tmp / "r.md")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp)
    return proc, tmp


def test_json_flag_prints_exactly_one_json_document(cli_run):
    proc, _ = cli_run
    report = Report.from_dict(json.loads(proc.stdout))  # anything else on stdout would raise
    assert proc.stdout.lstrip().startswith("{") and proc.stdout.rstrip().endswith("}")
    assert report.ok and proc.returncode == report.exit_code == 0
    assert proc.stderr.strip()  # the console table and progress went to stderr


def test_cli_writes_junit_and_markdown(cli_run):
    proc, tmp = cli_run
    xml = JUnitXml.fromfile(str(tmp / "r.xml"))
    assert _agrees(xml, proc.returncode) and xml.tests >= 5
    assert [c.name for c in next(iter(xml))] == ["conversion", "mobile-compatibility",
                                                 "numerics: logits", "latency", "verdict"]
    text = (tmp / "r.md").read_text()
    assert "| onnx-mobile fp32 | ✅ passed |" in text
    assert "<summary>onnx-mobile fp32: deployment snippets (Kotlin, Python)</summary>" in text


def test_onnx_mobile_snippets_hold_the_real_names_and_run(cli_run):
    proc, tmp = cli_run
    snippets = Report.from_json(proc.stdout).targets["onnx-mobile"].snippets
    assert set(snippets) == {"kotlin", "python"}
    for code in snippets.values():
        for name in ("bert_encoder.ort", "input_ids", "attention_mask", "logits"):
            assert name in code
    assert "LongBuffer" in snippets["kotlin"] and "longArrayOf(1, 32)" in snippets["kotlin"]
    assert "np.zeros((1, 32), dtype=np.int64)" in snippets["python"]
    run = subprocess.run([sys.executable, "-c", snippets["python"] + "\nprint(logits.shape)"],
                         capture_output=True, text=True, cwd=tmp / "out", timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(1, 3)"


@pytest.mark.slow
def test_tflite_ncnn_coreml_snippets_from_real_artifacts(tmp_path):
    """Each backend reads its own artifact: TFLite's flatbuffer tensors and positions, ncnn's
    blobs, Core ML's feature description (int64 inputs become int32 features)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTCONVERT_CACHE_DIR", str(tmp_path / "cache"))
        report = mtconvert.convert(FIXTURES / "bert_encoder.onnx",
                                   targets=["tflite", "ncnn", "coreml"], out_dir=tmp_path / "out",
                                   iterations=1, warmup=0)
    got = {name: t.snippets for name, t in report.targets.items()}
    assert {k: set(v) for k, v in got.items()} == {
        "tflite": {"kotlin", "python"}, "ncnn": {"cpp", "python"}, "coreml": {"swift", "python"}}
    assert '"bert_encoder.tflite"' in got["tflite"]["kotlin"]
    assert "input 1: attention_mask: int64 [1, 32]" in got["tflite"]["kotlin"]
    assert '"bert_encoder.ncnn.param"' in got["ncnn"]["cpp"]
    assert 'ex.input("in0", inputIds)' in got["ncnn"]["cpp"]
    swift = got["coreml"]["swift"]
    assert 'forResource: "bert_encoder", withExtension: "mlmodelc"' in swift
    assert "MLMultiArray(shape: [1, 32], dataType: .int32)" in swift
    assert 'out.featureValue(for: "logits")' in swift
    for target in ("tflite", "ncnn"):  # their runtimes are here: the Python snippets run
        run = subprocess.run([sys.executable, "-c", got[target]["python"] +
                              "\nprint(logits.shape)"], capture_output=True, text=True,
                             cwd=tmp_path / "out", timeout=300)
        assert run.returncode == 0 and run.stdout.strip().endswith("(1, 3)"), run.stderr
