"""--profile: each target's top operators by time from its runtime's own profiler (ONNX
Runtime, ncnn per layer), the ORT reference's too, in the report and its renderings."""
from __future__ import annotations

import io
import json

import onnx
import pytest

import mtconvert
from mtconvert.backends.profiling import ort as ort_profiling
from mtconvert.render import console, html, markdown
from mtconvert.report import Report
from mtconvert.run.profile import summarize


def test_summary_lists_the_slowest_operators_and_types_with_their_shares():
    ops = [("a", "MatMul", 3.0), ("b", "Add", 1.0), ("c", "MatMul", 5.0), ("d", "Softmax", 1.0)]
    s = summarize(ops, runs=7, top=2)
    assert s["runs"] == 7 and s["total_ms"] == 10.0 and s["operators"] == 4
    assert [o["name"] for o in s["ops"]] == ["c", "a"]
    assert s["ops"][0] == {"name": "c", "op_type": "MatMul", "ms": 5.0, "share": 0.5}
    assert s["op_types"][0] == {"op_type": "MatMul", "ms": 8.0, "share": 0.8, "count": 2}
    assert len(s["op_types"]) == 2


def test_ort_trace_leaves_the_first_run_out_and_takes_each_nodes_median():
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def kernel(node, ts, us):
        return {"cat": "Node", "name": f"{node}_kernel_time", "ts": ts, "dur": us,
                "args": {"op_name": "MatMul"}}

    events = [run(0, 100), kernel("mm", 10, 90_000),  # warm-up run: left out
              run(100, 100), kernel("mm", 110, 1000),
              run(200, 100), kernel("mm", 210, 3000),
              run(300, 100), kernel("mm", 310, 50_000)]  # a preempted run: the median ignores it
    (op,) = ort_profiling.aggregate(events, runs=3)
    assert (op.name, op.op_type, op.ms) == ("mm", "MatMul", 3.0)


def test_a_runtime_without_a_profiler_says_why(tiny_onnx, tmp_path, fake_registry):
    report = mtconvert.convert(tiny_onnx, targets=["fake"], out_dir=tmp_path / "o",
                               registry=fake_registry, iterations=2, warmup=0, profile=True)
    assert set(report.targets["fake"].profile) == {"unavailable"}
    plain = mtconvert.convert(tiny_onnx, targets=["fake"], out_dir=tmp_path / "p",
                              registry=fake_registry, iterations=2, warmup=0)
    assert plain.targets["fake"].profile is None and plain.reference.profile is None


@pytest.mark.slow
def test_profile_of_real_runtimes(fixtures_dir, tmp_path):
    source = fixtures_dir / "bert_encoder.onnx"
    report = mtconvert.convert(source, targets=["onnx-mobile", "ncnn"], out_dir=tmp_path / "o",
                               iterations=5, warmup=1, threads=1, profile=True)
    assert report.ok, [t.reason for t in report.targets.values()]
    graph_nodes = {n.name for n in onnx.load(str(source), load_external_data=False).graph.node}
    ncnn_param = next(a.path for a in report.targets["ncnn"].artifacts if a.role == "artifact")
    ncnn_layers = {ln.split()[1] for ln in open(ncnn_param).read().splitlines()[2:]}
    for prof, names in [(report.reference.profile, graph_nodes),
                        (report.targets["onnx-mobile"].profile, None),
                        (report.targets["ncnn"].profile, ncnn_layers)]:
        assert prof["runs"] == 5 and prof["total_ms"] > 0 and prof["operators"] > 10
        ms = [o["ms"] for o in prof["ops"]]
        assert ms == sorted(ms, reverse=True) and len(ms) == 10
        assert 0 < sum(o["share"] for o in prof["op_types"]) <= 1.0001
        if names is not None:  # the runtime's own operators, by their names
            assert {o["name"] for o in prof["ops"]} & names
    assert {o["name"] for o in report.targets["ncnn"].profile["ops"]} <= ncnn_layers
    assert "MatMul" in {t["op_type"] for t in report.reference.profile["op_types"]} | {
        t["op_type"] for t in report.targets["onnx-mobile"].profile["op_types"]}

    again = Report.from_json(report.to_json())
    assert again.targets["ncnn"].profile == report.targets["ncnn"].profile
    assert json.loads(report.to_json())["reference"]["profile"] == report.reference.profile
    slowest = report.targets["ncnn"].profile["ops"][0]["name"]
    out = io.StringIO()
    console.render(report, out)
    assert slowest in out.getvalue()
    assert slowest in markdown.to_markdown(report) and slowest in html.to_html(report)


def test_console_does_not_repeat_an_op_type_the_name_already_says():
    from mtconvert.render.console import _op_label

    def line(kind, name):
        return _op_label({"op_type": kind, "name": name}) + name

    assert line("XNNPACK delegate call, outside its operators",
                "XNNPACK delegate call #6: outside its operators") == \
        "XNNPACK delegate call #6: outside its operators"
    assert line("native_layer_norm.out", "native_layer_norm.out #1") == "native_layer_norm.out #1"
    assert line("MatMul", "matmul_111") == "MatMul matmul_111"  # ncnn: the type is needed
