"""The PyTorch-based targets' shared export of an in-memory module (backends/torch_inputs.py)."""
import pytest

from mtconvert.backends import torch_inputs
from mtconvert.backends.base import PreparedSource, TensorSpec

torch = pytest.importorskip("torch")


def _source(module, tmp_path):
    return PreparedSource(format="torch", name="m", onnx_path=tmp_path / "none.onnx",
                          inputs=(TensorSpec("x", (2, 8), "float32"),),
                          outputs=(TensorSpec("y", (2, 4), "float32"),),
                          input_shapes={"x": (2, 8)}, work_dir=tmp_path, torch_module=module)


def _fake_params_while_tracing(module, tmp_path, monkeypatch):
    """Whether the module's own parameters were fake tensors while export_module traced."""
    from torch._subclasses.fake_tensor import FakeTensor

    real_export = torch.export.export
    seen = []

    def export(mod, args, **kw):
        hook = mod.register_forward_pre_hook(lambda _m, _a: seen.append(
            any(isinstance(p, FakeTensor) for p in module.parameters())))
        try:
            return real_export(mod, args, **kw)
        finally:
            hook.remove()

    monkeypatch.setattr(torch.export, "export", export)
    torch_inputs.export_module(_source(module, tmp_path), {"x": [2, 8]}, tmp_path / "m.pt2", "t")
    assert seen, "the trace never ran the module"
    return any(seen)


def test_export_leaves_the_module_real_for_other_threads(tmp_path, monkeypatch):
    """Non-strict torch.export swaps a module's parameters for fake tensors while it traces; the
    run uses the same module from other threads then (the reference timed in-process, another
    target exporting with --jobs 2: "storage on device meta"), so the export traces a copy."""
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    before = [p.detach().clone() for p in module.parameters()]
    assert not _fake_params_while_tracing(module, tmp_path, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    # the check above can see the problem: exporting the module itself makes them fake
    monkeypatch.setattr(torch_inputs, "private_copy", lambda m: m)
    (tmp_path / "itself").mkdir()
    assert _fake_params_while_tracing(module, tmp_path / "itself", monkeypatch)
