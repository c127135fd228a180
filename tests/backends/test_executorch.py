"""executorch with the real toolchain: torch.export / onnx2torch, the XNNPACK partitioner and
quantizer, and ExecuTorch's own runtime (executorch.runtime) running each .pte."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import mtconvert
from mtconvert.backends.executorch.backend import ExecutorchBackend, findings
from mtconvert.backends.executorch.pte import unrunnable
from mtconvert.backends.snippets import Port
from mtconvert.errors import ModelLoadError
from tests.models import quick_convert

pytestmark = pytest.mark.skipif(not ExecutorchBackend.availability().can_convert,
                                reason="executorch not installed")


def _run(model, out, **kw):
    return quick_convert("executorch", model, out, **kw).targets["executorch"]


def _codes(target):
    return {f["code"]: f for f in target.findings}


# --- fast: lint and snippets from program descriptions --------------------------------------

DESCRIBED = {"inputs": [{"shape": [1, 8], "dtype": "int64"}],
             "outputs": [{"shape": [1, 3], "dtype": "float32"}],
             "operators": {"aten::native_layer_norm.out": 2, "aten::embedding.out": 1},
             "delegates": {"XnnpackBackend": 3}}
DELEGATION = {"subgraphs": 3, "delegated": 5, "non_delegated": 3,
              "by_operator": {"aten_linear_default": {"delegated": 4, "non_delegated": 0},
                              "aten_native_layer_norm_default": {"delegated": 0,
                                                                 "non_delegated": 2},
                              "aten_add_tensor": {"delegated": 1, "non_delegated": 1}}}


def test_lint_names_delegated_and_portable_ops():
    program = DESCRIBED | unrunnable(DESCRIBED, {
        "operators": ["aten::native_layer_norm.out", "aten::embedding.out"],
        "backends": ["XnnpackBackend"]})
    found = {f.code: f for f in findings(program, DELEGATION)}
    assert "aten_linear_defaultx4" in found["executorch-delegation"].message
    assert "not delegated: aten_native_layer_norm_defaultx2, aten_add_tensorx1" in \
        found["executorch-delegation"].message
    assert "XnnpackBackendx3" in found["executorch-program"].message
    assert found["executorch-not-delegated"].severity == "warning"
    assert all(f.severity != "error" for f in found.values())


def test_an_op_without_a_kernel_fails_the_lint_by_name():
    program = DESCRIBED | unrunnable(DESCRIBED, {"operators": ["aten::embedding.out"],
                                                 "backends": []})
    errors = [f for f in findings(program, None) if f.severity == "error"]
    assert {f.code for f in errors} == {"executorch-missing-kernel", "executorch-missing-backend"}
    assert "aten::native_layer_norm.out" in errors[0].message
    assert "XnnpackBackend" in errors[1].message


def test_the_runtime_registers_what_the_lowered_programs_call():
    from mtconvert.backends.executorch.pte import runtime_registry

    registry = runtime_registry()
    assert "XnnpackBackend" in registry["backends"]
    assert {"aten::native_layer_norm.out", "aten::embedding.out"} <= set(registry["operators"])


def test_snippets_use_the_module_api_and_positions():
    from mtconvert.backends.executorch import snippets as et

    ins = [Port("input_ids", "input_ids", (1, 8), "int64", 0),
           Port("attention_mask", "attention_mask", (1, 8), "int64", 1)]
    outs = [Port("logits", "logits", (1, 3), "float32", 0)]
    kotlin = et.kotlin("bert.pte", ins, outs)
    assert "Module.load(file.absolutePath)" in kotlin
    assert "Tensor.fromBlob(LongArray(8), longArrayOf(1L, 8L))" in kotlin
    assert "module.forward(EValue.from(inputIds), EValue.from(attentionMask))" in kotlin
    assert "outputs[0].toTensor().dataAsFloatArray" in kotlin
    python = et.python("bert.pte", ins, outs)
    compile(python, "snippet.py", "exec")
    assert "torch.zeros((1, 8), dtype=torch.int64)" in python and "logits, = " in python


class IndexedEncoder:
    """Integer index arithmetic by a Python scalar (``arange(n) + 1``, as HF BERT builds its
    mask) and a MatMul by an [in, out] weight (an ONNX MatMul as onnx2torch traces it)."""

    @staticmethod
    def make():
        import torch

        class Indexed(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.pos = torch.nn.Parameter(torch.randn(16, 8))
                self.w = torch.nn.Parameter(torch.randn(8, 8))  # stored [in, out]

            def forward(self, x):
                return (x + self.pos[torch.arange(x.shape[1]) + 1]) @ self.w

        return Indexed().eval(), (torch.randn(1, 4, 8),)


def _quantize_indexed(monkeypatch=None):
    import torch

    from mtconvert.backends.executorch import convert

    module, args = IndexedEncoder.make()
    with torch.no_grad():
        program = torch.export.export(module, args, strict=False)
    steps = []
    quantized = convert._quantized(program, args, {"int8_scheme": "dynamic"}, steps)
    return module, args, quantized, steps


def test_int8_keeps_integer_index_arithmetic_integer(monkeypatch):
    """The XNNPACK quantizer makes the scalar of ``add.Tensor(int_tensor, 1)`` a float32 tensor
    (its _convert_scalars_to_attrs): without the rewrite to add.Scalar, the indices turn float."""
    import torch

    from mtconvert.backends.executorch import convert

    module, args, quantized, steps = _quantize_indexed()
    assert any(s.startswith("1 integer add/mul with a Python scalar") for s in steps)
    ref, out = module(*args), quantized.module()(*args)
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), 0) > 0.999
    monkeypatch.setattr(convert, "_integer_scalars", lambda module: 0)
    with pytest.raises(IndexError, match="tensors used as indices must be long"):
        _quantize_indexed()


def test_int8_stores_embedding_tables_as_int8_rows():
    """nn.Embedding and a Gather-like ``aten.index`` on a float table become
    ``embedding_byte`` on an int8 table with one scale per row; the lookups stay close."""
    import torch

    from mtconvert.backends.executorch import convert

    class Lookups(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(50, 16)
            self.register_buffer("table", torch.randn(20, 16))

        def forward(self, ids):
            return self.emb(ids) + self.table[ids % 20]

    module, args = Lookups().eval(), (torch.arange(12).reshape(1, 12) * 4 % 50,)
    with torch.no_grad():
        program = torch.export.export(module, args, strict=False)
    steps = []
    quantized = convert._quantized(program, args, {"int8_scheme": "dynamic"}, steps)
    assert "2 embedding table(s) as int8 with per-row scales" in " ".join(steps)
    graph = quantized.graph_module.graph
    assert sum("embedding_byte" in str(n.target) for n in graph.nodes) == 2
    ints = [v for v in quantized.state_dict.values() if v.dtype == torch.int8] + \
        [v for v in quantized.constants.values() if getattr(v, "dtype", None) == torch.int8]
    assert sorted(tuple(v.shape) for v in ints) == [(20, 16), (50, 16)]
    ref, out = module(*args), quantized.module()(*args)
    assert 0 < (ref - out).abs().max() < 0.02 * ref.abs().max()


def test_int8_quantizes_a_matmul_by_an_untransposed_weight():
    _, _, quantized, steps = _quantize_indexed()
    assert any(s.startswith("1 mm/matmul/addmm of an untransposed [in, out] weight") for s in steps)
    targets = {str(n.target) for n in quantized.graph.nodes}
    assert "aten.linear.default" in targets
    assert any("dequantize_per_channel" in t for t in targets)  # the weight is int8 now


# --- slow: real conversions -----------------------------------------------------------------

FIXTURES = [f["name"] for f in json.loads(
    (Path(__file__).resolve().parents[2] / "fixtures" / "manifest.json").read_text())["fixtures"]]
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "QLinearMatMul", "ConvInteger", "QLinearConv"}


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory):
    """``get(fixture, precision)``: the fixture's ONNX to a .pte once per module, with a golden
    bundle: (target report, out, bundle). Converted inside the first test that asks, reused
    by the others; the module's conversions share one cache, so an int8 run's fp32 twin is the
    fp32 run's artifact (each .pte lowered once)."""
    done = {}
    cache = tmp_path_factory.mktemp("executorch-cache")

    def get(name, precision="fp32"):
        if (name, precision) not in done:
            root = tmp_path_factory.mktemp(f"executorch-{name}-{precision}")
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("MTCONVERT_CACHE_DIR", str(cache))
                t = _run(fixtures_dir / f"{name}.onnx", root / "out", precision=precision,
                         extra={"bundle": str(root / "gold")})
            done[name, precision] = (t, root / "out", root / "gold")
        return done[name, precision]
    return get


@pytest.fixture
def onnx_built(converted):
    return converted("bert_encoder")


def _int8_tables(t):
    """How many int8 embedding tables of a quantized source were folded to float (its
    ``dequantize:`` step), 0 for a float source."""
    for step in t.conversion.steps:
        found = re.match(r"dequantize: .* and (\d+) int8 tables folded", step)
        if found:
            return int(found.group(1))
    return 0


def _quantized_source(path):
    import onnx

    return bool({n.op_type for n in onnx.load(str(path)).graph.node} & QUANTIZED_OPS)


# in every run of the suite: the BERT fixture at both precisions and the dynamic-int8 source (its
# int8 embedding tables, its size gate); every other fixture x precision is the sweep
# (`make test-all`; pytest -m sweep)
IN_SUITE = {("bert_encoder", "fp32"), ("bert_encoder", "int8"), ("bert_int8_dynamic", "int8")}
CASES = [(f, p) if (f, p) in IN_SUITE else pytest.param(f, p, marks=pytest.mark.sweep)
         for f in FIXTURES for p in ("fp32", "int8")]


@pytest.mark.slow
@pytest.mark.parametrize("fixture,precision", CASES)
def test_every_fixture_to_pte_against_the_reference(fixture, precision, converted,
                                                    fixtures_dir):
    if precision != "fp32":
        converted(fixture, "fp32")  # first (a no-op when it ran): the twin is its lowering
    t, out, _ = converted(fixture, precision)
    assert t.numerics.runtime.startswith("executorch")
    assert t.numerics.passed
    assert t.status == "passed", t.reason
    if _int8_tables(t):  # the source's int8 tables, folded to float, are int8 again in the .pte
        assert any(re.match(r"\d+ embedding table\(s\) as int8 with per-row scales", s)
                   for s in t.conversion.steps), t.conversion.steps
        assert "executorch-missing-kernel" not in _codes(t)  # embedding_byte has its kernel
    quantized = _quantized_source(fixtures_dir / f"{fixture}.onnx")
    # a quantized source stays int8 whatever --precision says (its weights are int8 steps)
    assert t.precision == ("int8" if quantized else precision)
    suffix = "" if t.precision == "fp32" else f".{t.precision}"
    assert t.artifacts[0].path == str(out / f"{fixture}{suffix}.pte")
    if t.precision == "int8":  # judged with its fp32 twin, made the same way
        # the twin of a float source matches it; a quantized source's twin is its dequantized
        # graph, which the source's int8 steps keep from matching within fp32 tolerances
        assert "max_abs" in t.numerics.fp32_worst
        assert quantized or t.numerics.fp32_worst["max_abs"] < 1e-4
        assert all(0 < c["max_abs"] for c in t.numerics.vs_fp32.values())
        assert any("XNNPACK quantizer (PT2E)" in s for s in t.conversion.steps)
        assert "quantized_decomposed" in _codes(t)["executorch-delegation"]["message"]
        # not lowered again: the fp32 run's .pte of the same program (a quantized source's
        # fp32 run is its int8 run, restored whole from the conversion cache)
        assert quantized or any(s.startswith("fp32 twin: the .pte an fp32 run lowered")
                                for s in t.conversion.steps), t.conversion.steps
    else:
        assert t.numerics.worst["max_abs"] < 1e-4


@pytest.mark.slow
def test_onnx_fixture_passes_in_the_executorch_runtime(onnx_built, tmp_path):
    t, out, _ = onnx_built
    assert t.status == "passed", t.reason
    assert t.numerics.runtime.startswith("executorch")
    assert t.numerics.worst["max_abs"] < 1e-5
    assert t.latency is not None and t.latency.p50_ms > 0
    assert t.artifacts[0].path == str(out / "bert_encoder.pte")
    assert any(s.startswith("onnx2torch: ONNX -> torch.fx") for s in t.conversion.steps)
    assert any("written as aten.linear" in s for s in t.conversion.steps)
    lint = _codes(t)
    delegated, _, kept = lint["executorch-delegation"]["message"].partition("not delegated")
    assert "aten_linear_defaultx11" in delegated  # every linear layer runs in XNNPACK
    assert "native_layer_norm" in kept
    assert "XnnpackBackend" in lint["executorch-program"]["message"]
    assert "executorch-missing-kernel" not in lint
    assert "Module.load" in t.snippets["kotlin"] and "bert_encoder.pte" in t.snippets["python"]


@pytest.mark.slow
def test_validate_a_built_pte_and_a_corrupted_one(onnx_built, fixtures_dir, tmp_path):
    import onnx
    from onnx import numpy_helper

    _, out, _ = onnx_built
    source = fixtures_dir / "bert_encoder.onnx"
    garbage = tmp_path / "garbage.pte"
    garbage.write_bytes(b"not a program" * 64)
    with pytest.raises(ModelLoadError, match="not an ExecuTorch program"):
        mtconvert.validate(source, [garbage])
    # the classifier's weights, stored as they are, changed by 5%: a well-formed wrong program
    data = (out / "bert_encoder.pte").read_bytes()
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(source)).graph.initializer}
    old = weights["model.classifier.weight"].astype(np.float32).tobytes()
    assert data.count(old) == 1
    changed = tmp_path / "changed.pte"
    changed.write_bytes(data.replace(old, (np.frombuffer(old, np.float32) * 1.05).tobytes()))
    report = mtconvert.validate(source, [out / "bert_encoder.pte", changed], iterations=2,
                                warmup=1)
    good, bad = report.targets["executorch"], report.targets["executorch:changed.pte"]
    assert good.status == "passed", good.reason
    assert good.input_shapes == {"input_ids": [1, 32], "attention_mask": [1, 32]}
    assert "adopted" in _codes(good)
    assert bad.status == "failed" and "logits" in bad.reason
    assert report.exit_code == 1


@pytest.mark.slow
def test_golden_bundle_carries_the_pte(onnx_built):
    _, _, gold = onnx_built
    assert (gold / "executorch" / "bert_encoder.pte").is_file()
    report = mtconvert.verify(gold, iterations=2, warmup=1)
    t = report.targets["executorch"]
    assert t.status == "passed", t.reason
    assert report.exit_code == 0


@pytest.mark.slow
def test_torch_program_takes_the_torch_export_route(fixtures_dir, tmp_path):
    t = _run(fixtures_dir / "bert_encoder.pt2", tmp_path)
    assert t.status == "passed", t.reason
    assert "route torch.export: chosen (passed)" in t.conversion.steps
    assert t.numerics.worst["max_abs"] < 1e-5
    assert "aten_linear_defaultx14" in _codes(t)["executorch-delegation"]["message"]


class TinyEncoder:
    """A small nn.Module Transformer (embedding, one encoder layer, masked mean, head)."""

    @staticmethod
    def make():
        import torch

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.emb = torch.nn.Embedding(100, 32)
                self.layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0,
                                                              batch_first=True)
                self.head = torch.nn.Linear(32, 3)

            def forward(self, input_ids, attention_mask):
                h = self.layer(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
                m = attention_mask.unsqueeze(-1).float()
                return self.head((h * m).sum(1) / m.sum(1))

        ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(1, 16, dtype=torch.int64)
        mask[0, 12:] = 0
        return Tiny().eval(), (ids, mask)


@pytest.mark.slow
def test_torch_module_int8_is_judged_with_its_fp32_twin(tmp_path):
    module, example = TinyEncoder.make()
    t = _run(module, tmp_path, example_inputs=example, precision="int8")
    assert t.status == "passed", t.reason
    assert "route torch.export: chosen (passed)" in t.conversion.steps
    assert any("XNNPACK quantizer (PT2E)" in s for s in t.conversion.steps)
    assert Path(t.artifacts[0].path).name.endswith(".int8.pte")
    assert t.numerics.fp32_worst["max_abs"] < 1e-5  # the twin: exact
    change = next(iter(t.numerics.vs_fp32.values()))
    assert 0 < change["max_abs"] and change["cosine"] > 0.999  # int8 costs something
    assert "quantized_decomposed" in _codes(t)["executorch-delegation"]["message"]


@pytest.mark.slow
def test_dynamic_axes_give_a_static_pte_and_say_so(tiny_onnx, tmp_path):
    """The source's dynamic batch/sequence axes cannot become torch.export Dims through
    onnx2torch: the .pte is fixed at the first sweep shape, the other is skipped with the
    reason, and the report says why the program is static."""
    t = _run(tiny_onnx, tmp_path, seq_lens=(8, 16))
    assert t.status == "passed", t.reason
    assert t.input_shapes == {"input_ids": [1, 8], "attention_mask": [1, 8]}
    [other] = t.sweep
    assert other["input_shapes"] == {"input_ids": [1, 16], "attention_mask": [1, 16]}
    assert other["status"] == "skipped"
    assert other["reason"] == "the artifact is fixed to input_ids=1x8, attention_mask=1x8"
    warning = _codes(t)["executorch-fixed-shapes"]
    assert warning["severity"] == "warning"
    assert "input_ids axis 0 (batch), 1 (sequence)" in warning["message"]
    assert "torch.export refuses at symbolic sizes" in warning["message"]
    assert warning["message"] in t.conversion.steps


@pytest.mark.slow
def test_torch_program_int8_stays_on_the_torch_export_route(fixtures_dir, tmp_path):
    t = _run(fixtures_dir / "bert_encoder.pt2", tmp_path, precision="int8")
    assert t.status == "passed", t.reason
    assert t.conversion.steps[0] == "route torch.export: chosen (passed)"  # none rejected
    assert any("written as add.Scalar/mul.Scalar" in s for s in t.conversion.steps)
    delegation = _codes(t)["executorch-delegation"]["message"]
    assert "aten_linear_defaultx14" in delegation
    assert "quantized_decomposed_dequantize_per_channel_defaultx14" in delegation


# --- dynamic shapes: a .pt2 exported with torch.export Dims -------------------------------

class DynamicTiny:
    """A tiny masked-mean classifier exported with one Dim on the sequence axis (4..64)."""

    @staticmethod
    def module():
        import torch

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.emb = torch.nn.Embedding(50, 16)
                self.lin = torch.nn.Linear(16, 3)

            def forward(self, input_ids, attention_mask):
                m = attention_mask.unsqueeze(-1).float()
                return self.lin((self.emb(input_ids) * m).sum(1) / m.sum(1))

        return Tiny().eval()

    @staticmethod
    def save(path):
        import torch

        seq = torch.export.Dim("seq", min=4, max=64)
        args = (torch.randint(0, 50, (1, 16)), torch.ones(1, 16, dtype=torch.int64))
        program = torch.export.export(DynamicTiny.module(), args, dynamic_shapes={
            "input_ids": {1: seq}, "attention_mask": {1: seq}})
        torch.export.save(program, str(path))
        return path


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory):
    return DynamicTiny.save(tmp_path_factory.mktemp("dynamic") / "tiny.pt2")


@pytest.fixture(scope="module")
def dynamic_pte(dynamic_pt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamic-out")
    with pytest.MonkeyPatch.context() as mp:  # module scope: before the per-test private cache
        mp.setenv("MTCONVERT_CACHE_DIR", str(tmp_path_factory.mktemp("dynamic-cache")))
        return _run(dynamic_pt2, out, seq_lens=(8, 32)), out


@pytest.mark.slow
def test_a_dynamic_pt2_gives_one_pte_validated_at_both_ends(dynamic_pte):
    t, out = dynamic_pte
    assert t.status == "passed", t.reason
    assert t.input_shapes == {"input_ids": [1, 8], "attention_mask": [1, 8]}
    assert t.numerics.worst["max_abs"] < 1e-5
    [other] = t.sweep  # the same .pte at the range's other end, not "skipped"
    assert other["input_shapes"] == {"input_ids": [1, 32], "attention_mask": [1, 32]}
    assert other["status"] == "passed" and other["worst"]["max_abs"] < 1e-5
    assert any(s.startswith("torch.export of the PyTorch module with Dims input_ids axis 1 in "
                            "8..32; attention_mask axis 1 in 8..32") for s in t.conversion.steps)
    lint = _codes(t)
    assert "executorch-fixed-shapes" not in lint
    assert "input_ids axis 1 in 8..32" in lint["executorch-dynamic-shapes"]["message"]
    assert [p.name for p in out.iterdir() if p.suffix == ".pte"] == ["tiny.pte"]


@pytest.mark.slow
def test_the_pte_refuses_a_size_outside_its_dims_by_name(dynamic_pte):
    import torch

    from mtconvert.backends.base import Artifact
    from mtconvert.errors import RuntimeFailure

    _, out = dynamic_pte
    dims = {"input_ids": {"1": ["s0", 8, 32]}, "attention_mask": {"1": ["s0", 8, 32]}}
    pte = out / "tiny.pte"
    session = ExecutorchBackend().open(Artifact(
        target="executorch", primary=pte, files=(pte,), meta={
            "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"], "dims": dims}), 1)
    ids = np.arange(20, dtype=np.int64).reshape(1, 20) % 50
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, 20), np.int64)}
    inside = session.run(feeds)["logits"]  # a size between the validated ends
    expected = DynamicTiny.module()(*(torch.from_numpy(v) for v in feeds.values()))
    assert np.abs(inside - expected.detach().numpy()).max() < 1e-5
    long = {k: np.concatenate([v, v], axis=1) for k, v in feeds.items()}
    with pytest.raises(RuntimeFailure, match=r"input_ids axis 1 is 40: tiny\.pte was exported "
                                             r"for 8\.\.32 on that axis"):
        session.run(long)


def test_a_sweep_outside_the_pt2_range_is_a_usage_error(dynamic_pt2, tmp_path):
    from mtconvert.errors import UsageError

    with pytest.raises(UsageError, match=r"input_ids axis 1 = 128 is outside the range the "
                                         r"source was exported for: 4\.\.64"):
        _run(dynamic_pt2, tmp_path / "out", seq_lens=(8, 128))
    assert not (tmp_path / "out").exists()  # nothing half-written
