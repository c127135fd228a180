"""Per-layer quantization error of a failing int8 artifact (issue 20): each weight layer's error
against the float source, charged only for what it adds to its inputs' error."""
from pathlib import Path

import numpy as np
import pytest

from mtconvert import quant_error
from mtconvert.trace import Tensor
from mtconvert.validators.tolerances import PROFILES
from tests.models import quick_convert


def test_a_layer_is_charged_only_for_the_error_it_adds() -> None:
    rng = np.random.default_rng(0)
    x, h, r, y = (rng.standard_normal((2, 64)).astype(np.float32) for _ in range(4))
    source = [Tensor("x_in", "n0", "Sigmoid", x), Tensor("h", "mm1", "MatMul", h, [0]),
              Tensor("r", "relu", "Relu", r, [1]), Tensor("y", "mm2", "MatMul", y, [2])]

    def noisy(v: np.ndarray, rel: float) -> np.ndarray:
        n = rng.standard_normal(v.shape).astype(np.float32)
        return v + n / np.linalg.norm(n) * np.linalg.norm(v) * rel

    # the target fuses mm1 with its ReLU (no tensor of h): mm1 is seen at r
    target = [Tensor("t0", "t0", "X", x), Tensor("t_r", "fc1", "FULLY_CONNECTED", noisy(r, 0.2)),
              Tensor("t_y", "fc2", "FULLY_CONNECTED", noisy(y, 0.25))]
    errors = {e["node"]: e for e in quant_error._errors(source, target,
                                                        lambda _: PROFILES["int8"])}
    assert errors["mm1"]["output"] == "r" and errors["mm1"]["added"] == pytest.approx(0.2, 0.01)
    assert errors["mm2"]["relative_error"] == pytest.approx(0.25, 0.01)
    assert errors["mm2"]["added"] == pytest.approx(0.05, abs=0.01)  # 0.25 minus the 0.2 it read


@pytest.mark.slow
def test_a_failing_int8_artifact_names_its_worst_layers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                 torch.nn.Linear(64, 16)).eval()
    # a bound tighter than int8 rounding meets: the artifact fails, as a real one would
    report = quick_convert("tflite", module, tmp_path, example_inputs=(torch.randn(2, 32),),
                           precision="int8", min_cosine=0.999999)
    t = report.targets["tflite"]
    assert t.status == "failed"
    q = t.diagnostics["quantization_error"]
    assert q["weight_layers"] == 2 and len(q["layers"]) == 2
    assert [e["op_type"] for e in q["layers"]] == ["Gemm", "Gemm"]
    assert q["layers"][0]["added"] >= q["layers"][1]["added"] and q["layers"][0]["added"] > 0
