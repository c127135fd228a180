"""--profile for ExecuTorch: ETDump's events (kernel calls, XNNPACK's operators inside each
delegate call) summed up in the report; Core ML says why it has no profile."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mtconvert.backends.executorch.backend import ExecutorchBackend
from mtconvert.backends.profiling import executorch as etdump
from mtconvert.report import Report

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")


def _event(name, instruction, start, end, delegate_op=None):
    return {"name": name, "instruction": (0, instruction), "delegate_op": delegate_op,
            "start": start, "end": end}


def _execute(kernel_ns, gemm_us, call_ns):
    """One Method::execute: a layer_norm kernel call, then a delegate call holding one GEMM
    (XNNPACK logs it in whole microseconds, from the call's start)."""
    return [_event("native_call_native_layer_norm.out", 0, 100, 100 + kernel_ns - 50),
            _event("OPERATOR_CALL", 0, 90, 90 + kernel_ns),
            _event(None, 1, 1000, 1000 + gemm_us * 1000, "Fully Connected (NC, F32) GEMM #1"),
            _event("DELEGATE_CALL", 1, 1000, 1000 + call_ns)]


def test_etdump_events_partition_each_instruction_and_take_the_median():
    runs = [_execute(400, 2, 3000), _execute(600, 3, 4000), _execute(90_000, 2, 3500)]
    got = {o.name: o for o in etdump.aggregate(runs, ["XnnpackBackend"])}
    assert set(got) == {"native_layer_norm.out #1",
                        "XNNPACK delegate call #1: Fully Connected (NC, F32) GEMM #1",
                        f"XNNPACK delegate call #1: {etdump.OUTSIDE}"}
    assert got["native_layer_norm.out #1"].ms == pytest.approx(0.0006)  # the preempted run out
    gemm = got["XNNPACK delegate call #1: Fully Connected (NC, F32) GEMM #1"]
    assert (gemm.op_type, gemm.ms) == ("Fully Connected (NC, F32) GEMM", pytest.approx(0.002))
    # per run, the GEMM and the rest of the call add up to the call: 3000-2000, 4000-3000, ...
    assert got[f"XNNPACK delegate call #1: {etdump.OUTSIDE}"].ms == pytest.approx(0.001)


def test_a_delegate_call_without_inner_events_is_the_call_not_an_operator():
    run = [_event("DELEGATE_CALL", 0, 0, 5000), _event("DELEGATE_CALL", 3, 6000, 8000)]
    got = etdump.aggregate([run], ["XnnpackBackend"])
    assert [(o.name, o.op_type, o.ms) for o in got] == [
        ("XNNPACK delegate call #1", "XNNPACK delegate call", 0.005),
        ("XNNPACK delegate call #2", "XNNPACK delegate call", 0.002)]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    if not ExecutorchBackend.availability().can_run:
        pytest.skip("executorch not installed")
    from tests.models import tiny_encoder

    tmp = tmp_path_factory.mktemp("etprofile")
    model = tiny_encoder(tmp / "tiny.onnx")
    env = dict(os.environ, MTCONVERT_CACHE_DIR=str(tmp / "cache"))
    proc = subprocess.run([MTCONVERT, str(model), "--to", "executorch,coreml", "--profile",
                           "--out", str(tmp / "out"), "--json", "--iterations", "5",
                           "--warmup", "2", "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Report.from_dict(json.loads(proc.stdout))


@pytest.mark.slow
def test_executorch_profile_lists_kernels_and_delegate_calls(profiled):
    from mtconvert.backends.executorch.pte import read

    target = profiled.targets["executorch"]
    prof = target.profile
    assert prof["runtime"].startswith("executorch") and prof["runs"] > 0
    assert prof["ops"] and all(o["ms"] >= 0 for o in prof["ops"]) and prof["ops"][0]["ms"] > 0
    # every kernel call and every delegate call of the program, once each
    pte = next(a.path for a in target.artifacts if a.role == "artifact")
    program = read(Path(pte))
    types = {t["op_type"]: t["count"] for t in prof["op_types"]}
    kernels = Counter({op.split("::")[-1]: n for op, n in program["operators"].items()})
    assert len(prof["op_types"]) < 10  # all of them listed (the summary keeps the top 10)
    assert {k: types.get(k) for k in kernels} == dict(kernels)
    calls = [o["name"] for o in prof["ops"] if o["name"].startswith("XNNPACK delegate call #")]
    assert calls and sum(program["delegates"].values()) >= max(
        int(n.split("#")[1].split(":")[0]) for n in calls)


@pytest.mark.slow
def test_each_runs_entries_sum_to_less_than_its_measured_wall_time(profiled, tmp_path):
    """ETDump's ticks read as nanoseconds: each execute's entries (the partition of its
    instructions' time) add up to no more than that execute's wall time, and not to a
    vanishing part of it (a unit off by 1000 would break one bound or the other)."""
    import time

    import torch
    from executorch.runtime import Runtime

    target = profiled.targets["executorch"]
    pte = next(a.path for a in target.artifacts if a.role == "artifact")
    program = Runtime.get().load_program(Path(pte), enable_etdump=True)
    method = program.load_method("forward")
    meta = method.metadata
    args = [torch.ones(tuple(meta.input_tensor_meta(i).sizes()), dtype=torch.int64)
            for i in range(meta.num_inputs())]
    walls = []
    for _ in range(6):
        t0 = time.perf_counter()
        method.execute(args)
        walls.append((time.perf_counter() - t0) * 1000.0)
    dump = tmp_path / "run.etdp"
    program.write_etdump_result_to_file(str(dump), str(dump.with_suffix(".bin")))
    runs = etdump.read_etdump(dump.read_bytes())
    assert len(runs) == len(walls)
    totals = [sum(o.ms for o in etdump.aggregate([run], ["XnnpackBackend"])) for run in runs]
    assert all(0.01 * wall < total <= wall for total, wall in zip(totals, walls, strict=True)), (
        totals, walls)


@pytest.mark.slow
def test_coreml_says_why_it_has_no_profile(profiled):
    why = profiled.targets["coreml"].profile["unavailable"]
    assert "mil-reference" in why and "MLComputePlan" in why
