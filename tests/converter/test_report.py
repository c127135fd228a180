import json

import pytest

from mtconvert.report import (ArtifactFile, Conversion, Latency, Memory, Numerics, ReferenceInfo,
                              Report, SourceInfo, TargetMap, TargetReport)


def _report(*statuses):
    lat = Latency(1.0, 2.0, 3.0, 1.5, 10, 2, 2)
    targets = [TargetReport(f"t{i}", s, None if s == "passed" else "why",
                            artifacts=(ArtifactFile("/x/m.ort", 10),),
                            conversion=Conversion(1.5, ("a", "b"), {"tool": "1"}),
                            numerics=Numerics(s == "passed", "rt",
                                              {"output": "y", "max_abs": 1e-6, "cosine": 1.0},
                                              {"y": {"passed": True, "max_abs": 1e-6}}),
                            latency=lat, memory=Memory(100.0, 50.0))
               for i, s in enumerate(statuses)]
    src = SourceInfo("/m.onnx", "onnx", "ab" * 32, ({"name": "x", "shape": ["batch", 4],
                                                      "dtype": "float32"},),
                     ({"name": "y", "shape": [1], "dtype": "float32"},), {"x": [1, 4]})
    return Report(src, ReferenceInfo("onnxruntime-cpu", "1.0", lat), TargetMap(targets))


@pytest.mark.parametrize("statuses,ok,code", [
    (("passed", "passed"), True, 0), (("passed", "failed"), False, 1),
    (("passed", "skipped"), False, 1), (("failed", "error"), False, 3), ((), False, 1)])
def test_ok_and_exit_code(statuses, ok, code):
    r = _report(*statuses)
    assert (r.ok, r.exit_code) == (ok, code)


def test_json_contract_fields():
    d = json.loads(_report("passed").to_json())
    assert d["schema_version"] == 1 and d["ok"] is True
    assert set(d["source"]) >= {"path", "format", "sha256", "inputs", "outputs"}
    assert set(d["reference"]) >= {"runtime", "latency"}
    assert set(d["reference"]["latency"]) >= {"p50_ms", "p90_ms", "p99_ms", "mean_ms"}
    t = d["targets"][0]
    assert set(t) >= {"name", "status", "reason", "artifacts", "conversion", "numerics",
                      "latency", "memory"}
    assert t["artifacts"] == [{"path": "/x/m.ort", "bytes": 10, "role": "artifact"}]  # role: added
    assert set(t["conversion"]) >= {"seconds", "steps", "tool_versions"}
    assert t["conversion"]["steps"] == ["a", "b"]
    assert set(t["numerics"]) >= {"passed", "worst", "outputs"}
    assert set(t["numerics"]["worst"]) == {"output", "max_abs", "cosine"}
    assert set(t["latency"]) >= {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "iterations",
                                 "warmup", "threads"}
    assert isinstance(t["latency"]["p50_ms"], float)
    assert set(t["memory"]) >= {"peak_rss_mb"}


def test_round_trip_and_mapping_access():
    r = _report("passed", "failed")
    back = Report.from_json(r.to_json())
    assert back == r
    assert list(back.targets) == ["t0", "t1"] and back.targets["t1"].status == "failed"


def test_rejects_unknown_schema_and_status():
    d = _report("passed").to_dict() | {"schema_version": 99}
    with pytest.raises(ValueError, match="schema_version"):
        Report.from_dict(d)
    with pytest.raises(ValueError, match="status"):
        TargetReport("x", "maybe")
