"""``mtconvert matrix --raw``: the raw-toolchain twins of the matrix file's cells, a tool's crash
as the raw cell's error, the renderers' raw columns (shown, never gated), and one real raw cell
per toolchain on the bert_encoder fixture judged by mtconvert's validator."""
import io
import json
import textwrap
from pathlib import Path

import pytest
from junitparser import JUnitXml

from mtconvert import matrix_spec, raw
from mtconvert.backends.process import python_cmd, run_tool
from mtconvert.errors import UsageError
from mtconvert.matrix_report import Cell, MatrixReport
from mtconvert.render import render
from mtconvert.report import TargetReport
from tests.models import tiny_encoder

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"


def _spec(tmp: Path, text: str, raw_cells: bool = True):
    tiny_encoder(tmp / "tiny.onnx")
    (tmp / "tiny.pt2").write_bytes(b"not read by the spec")
    path = tmp / "zoo.toml"
    path.write_text(textwrap.dedent(text))
    return matrix_spec.load(path, tmp / "out", raw=raw_cells)


# --- the matrix file --------------------------------------------------------------------------
def test_raw_twins_follow_each_fp32_cell_of_a_target_with_a_toolchain(tmp_path):
    spec = _spec(tmp_path, """
        targets = ["tflite", "ncnn", "coreml", "onnx-mobile"]
        precisions = ["fp32", "int8"]
        [models.tiny]
        path = "tiny.onnx"
        raw_sources = { pt2 = "tiny.pt2" }
        """)
    ids = [c.id for c in spec.cells]
    assert ids[:3] == ["tiny/tflite/fp32", "tiny/tflite/fp32/raw-onnx2tf", "tiny/tflite/int8"]
    assert [c.raw for c in spec.cells if c.raw] == ["onnx2tf", "pnnx", "coremltools",
                                                     "ort-format-tool"]
    assert all(c.precision == "fp32" for c in spec.cells if c.raw)  # defaults make fp32 only
    twin = spec.cells[1]
    assert twin.sources == {"onnx": str(tmp_path / "tiny.onnx"), "pt2": str(tmp_path / "tiny.pt2")}
    assert twin.values["out_dir"] == str(tmp_path / "out" / "tiny" / "tflite-fp32-raw-onnx2tf")
    assert twin.file_name == "tiny.tflite.fp32.raw-onnx2tf.json"
    assert twin.key() != spec.cells[0].key()
    assert matrix_spec.CellSpec(**twin.to_dict()) == twin  # how a Ray task receives it
    # without --raw: the same cells as before, with the keys they had (--resume keeps them)
    plain = _spec(tmp_path, (tmp_path / "zoo.toml").read_text(), raw_cells=False)
    assert [c.id for c in plain.cells] == [i for i in ids if "/raw-" not in i]
    assert plain.cells[0].key() == spec.cells[0].key()


def test_raw_sources_takes_onnx_and_pt2_only(tmp_path):
    with pytest.raises(UsageError, match="raw_sources takes onnx and pt2, not tflite"):
        _spec(tmp_path, 'targets = ["ncnn"]\n[models.tiny]\npath = "tiny.onnx"\n'
                        'raw_sources = { tflite = "x.tflite" }\n')


def test_a_raw_cell_without_its_form_is_skipped_with_the_fix(tmp_path):
    spec = _spec(tmp_path, 'targets = ["coreml"]\n[models.tiny]\npath = "tiny.onnx"\n')
    record = raw.run_cell(spec.cells[1])
    cell = Cell.from_dict(record["cell"])
    assert (cell.status, cell.raw) == ("skipped", "coremltools")
    assert "takes a .pt2" in cell.reason and "raw_sources" in cell.reason
    assert record["key"] == spec.cells[1].key()


def test_a_raw_tool_crash_is_that_cells_error_with_its_last_error_line(tmp_path, monkeypatch):
    def crashing(onnx, out, timeout, shapes, note):  # noqa: ANN001, ANN202
        cmd = python_cmd("-c", "import sys; print('converting...'); "
                         "print('ValueError: no layer for Erf', file=sys.stderr); sys.exit(1)")
        note("onnx2tf -i tiny.onnx -o out")
        run_tool(cmd, target="tflite", step="onnx2tf", log_path=out / "raw.log",
                 timeout_s=60)

    monkeypatch.setitem(raw.CONVERTERS, "onnx2tf", crashing)
    spec = _spec(tmp_path, 'targets = ["tflite"]\n[models.tiny]\npath = "tiny.onnx"\n')
    cell = Cell.from_dict(raw.run_cell(spec.cells[1])["cell"])
    assert cell.status == "error"
    assert cell.reason == "onnx2tf: exit code 1: ValueError: no layer for Erf"
    assert cell.command == "onnx2tf -i tiny.onnx -o out" and "raw.log" in cell.error
    assert (Path(spec.cells[1].values["out_dir"]) / "raw.log").is_file()


# --- the renderers ------------------------------------------------------------------------------
def _report() -> MatrixReport:
    tr = TargetReport("tflite", "passed")
    cells = (
        Cell("bert", "tflite", "fp32", "passed", None, tr),
        Cell("bert", "tflite", "fp32", "error", "onnx2tf: exit code 1: ValueError: boom",
             error="onnx2tf: exit code 1: ValueError: boom", raw="onnx2tf",
             command="onnx2tf -i bert.onnx -o out"),
        Cell("bert", "onnx-mobile", "fp32", "passed", None, TargetReport("onnx-mobile", "passed")),
        Cell("bert", "onnx-mobile", "fp32", "passed", None,
             TargetReport("onnx-mobile", "passed"), raw="ort-format-tool"),
        Cell("bert", "ncnn", "fp32", "passed", None, TargetReport("ncnn", "passed")),
        Cell("bert", "ncnn", "fp32", "failed", "layers the installed ncnn cannot create: Tensor.to",
             TargetReport("ncnn", "failed"), raw="pnnx"),
    )
    return MatrixReport(cells, {"matrix": "zoo.toml", "executor": "local", "raw": True}, 12.0,
                        "0.0", "2026-12-03T10:00:00+00:00")


def test_raw_cells_are_shown_beside_their_target_but_not_gated():
    report = _report()
    assert report.ok and report.exit_code == 0  # a raw toolchain's failure gates nothing
    assert report.counts()["passed"] == 3 and report.raw_counts() == {
        "passed": 1, "failed": 1, "error": 1, "skipped": 0}
    assert report.columns[:2] == ["tflite fp32", "tflite fp32 raw onnx2tf"]
    assert report.label("tflite fp32 raw onnx2tf") == "raw onnx2tf"
    assert MatrixReport.from_json(report.to_json()) == report
    assert json.loads(report.to_json())["raw_counts"]["error"] == 1


def test_markdown_html_and_console_show_raw_columns_and_their_reasons():
    report = _report()
    md = io.StringIO()
    render("markdown", report, md)
    text = md.getvalue()
    assert "| model | tflite fp32 | raw onnx2tf | onnx-mobile fp32 | raw ort-format-tool |" in text
    assert "3/3 cells passed" in text and "not gated): 1/3 passed (1 failed, 1 error)" in text
    assert "**bert/tflite/fp32/raw-onnx2tf** (error): onnx2tf: exit code 1" in text
    html = io.StringIO()
    render("html", report, html)
    assert "<th>raw pnnx</th>" in html.getvalue() and "1/3 passed" in html.getvalue()
    con = io.StringIO()
    render("console", report, con)
    assert "raw onnx2tf" in con.getvalue() and "3/3 cells passed" in con.getvalue()


def test_junit_skips_raw_cells_so_it_agrees_with_the_exit_code():
    buf = io.BytesIO()
    render("junit", _report(), buf)
    xml = JUnitXml.fromstring(buf.getvalue().decode())
    assert (xml.tests, xml.failures, xml.errors, xml.skipped) == (6, 0, 0, 3)
    case = next(c for s in xml for c in s if c.name == "tflite fp32 raw onnx2tf")
    assert "not gated: error: onnx2tf: exit code 1" in case.result[0].message
    assert "command: onnx2tf -i bert.onnx -o out" in case.system_out


# --- real toolchains on the bert_encoder fixture ------------------------------------------------
def _fixture_cell(tmp_path: Path, target: str):
    path = tmp_path / "zoo.toml"
    path.write_text(textwrap.dedent(f"""
        targets = ["{target}"]
        [options]
        iterations = 1
        warmup = 0
        timeout = 300
        [models.bert_encoder]
        path = "{FIXTURES / 'bert_encoder.onnx'}"
        inputs = "{FIXTURES / 'bert_encoder.inputs.npz'}"
        raw_sources = {{ pt2 = "{FIXTURES / 'bert_encoder.pt2'}" }}
        """))
    spec = matrix_spec.load(path, tmp_path / "out", raw=True)
    twin = spec.cells[1]
    before = _hashes()
    record = raw.run_cell(twin)
    assert record["key"] == twin.key()
    assert _hashes() == before  # no tool writes over the user's model (onnx2tf would: -i)
    return twin, Cell.from_dict(record["cell"]), record


def _hashes() -> dict[str, str]:
    import hashlib

    return {n: hashlib.sha256((FIXTURES / n).read_bytes()).hexdigest()
            for n in ("bert_encoder.onnx", "bert_encoder.pt2")}


def _judged_or_tool_error(cell: Cell, tool: str) -> None:
    """Either the validator judged the artifact (a report with its checks), or the tool
    refused (error, no report, its own error line)."""
    assert cell.raw == tool and cell.command
    if cell.status == "error":
        assert cell.report is None and cell.reason.startswith(f"{tool}: ")
        assert "\n" not in cell.reason and "log:" in cell.error
    else:
        assert cell.report is not None and cell.status in ("passed", "failed")
        assert cell.report.artifacts


@pytest.mark.slow
def test_raw_ort_format_tool_passes_the_validator(tmp_path):
    twin, cell, record = _fixture_cell(tmp_path, "onnx-mobile")
    assert cell.status == "passed", cell.reason
    assert cell.command.startswith("python -m onnxruntime.tools.convert_onnx_models_to_ort ")
    assert cell.report.numerics.passed and cell.report.numerics.outputs
    assert (Path(twin.values["out_dir"]) / "bert_encoder.ort").is_file()
    assert record["report"]["settings"]["mode"] == "validate"  # judged by `mtconvert validate`


@pytest.mark.slow
def test_raw_pnnx_at_the_validation_shapes_is_judged_in_ncnn(tmp_path):
    twin, cell, _ = _fixture_cell(tmp_path, "ncnn")
    assert cell.command == "pnnx bert_encoder.onnx 'inputshape=[2,16]i64,[2,16]i64'"
    assert (Path(twin.values["out_dir"]) / "bert_encoder.ncnn.param").is_file()
    assert cell.report is not None  # the tool wrote its files: the validator judged them
    _judged_or_tool_error(cell, "pnnx")


@pytest.mark.slow
def test_raw_onnx2tf_as_a_user_types_it(tmp_path):
    twin, cell, _ = _fixture_cell(tmp_path, "tflite")
    assert cell.command.startswith("onnx2tf -i ") and cell.command.endswith(
        f"-o {twin.values['out_dir']}")
    _judged_or_tool_error(cell, "onnx2tf")


@pytest.mark.slow
def test_raw_coremltools_on_the_torch_export_program(tmp_path):
    _, cell, _ = _fixture_cell(tmp_path, "coreml")
    assert cell.command == ("ct.convert(torch.export.load('bert_encoder.pt2')"
                            ".run_decompositions({})).save('bert_encoder.mlpackage')")
    _judged_or_tool_error(cell, "coremltools")
