"""Task accuracy (--eval-data): labelled classification, per-token labels, and embedding
neighbours without labels; the gate's default per profile and its override."""
import numpy as np
import pytest

import mtconvert
from mtconvert.errors import UsageError
from mtconvert.validators import accuracy


def test_metrics():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy.classification(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    tokens = np.zeros((1, 3, 2))
    tokens[0, :, 1] = 1
    assert accuracy.classification(tokens, np.array([[1, -100, 0]])) == 0.5
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((12, 8))
    assert accuracy.retrieval_overlap(emb, emb, 5) == (1.0, 5)
    shuffled = rng.standard_normal((12, 8))
    assert accuracy.retrieval_overlap(emb, shuffled, 5)[0] < 0.8
    assert accuracy.judge("accuracy", 0.9, 0.88, 0.5, 10)["passed"] is False
    assert accuracy.judge("accuracy", 0.9, 0.9, 0.0, 10)["passed"] is True


def _data(tmp_path, n=10, labels=True):
    rng = np.random.default_rng(3)
    arrays = {"input_ids": rng.integers(0, 50, (n, 12)),
              "attention_mask": np.ones((n, 12), np.int64)}
    if labels:
        arrays["labels"] = rng.integers(1, 3, n)  # never class 0 (the skew knob raises it)
    np.savez(tmp_path / "eval.npz", **arrays)
    return tmp_path / "eval.npz"


def _run(tiny_onnx, tmp_path, registry, **kw):
    return mtconvert.convert(tiny_onnx, targets=["fake"], out_dir=tmp_path / "o",
                             registry=registry, iterations=2, warmup=0,
                             input_shapes={"input_ids": "1x12"}, **kw)


def test_exact_target_keeps_the_reference_accuracy(tiny_onnx, tmp_path, fake_registry):
    report = _run(tiny_onnx, tmp_path, fake_registry, eval_data=_data(tmp_path))
    acc = report.targets["fake"].accuracy
    assert acc["metric"] == "accuracy" and acc["items"] == 10 and acc["passed"]
    assert acc["target"] == acc["reference"] and acc["max_drop_points"] == 0.0
    assert report.ok


def test_a_target_that_loses_accuracy_fails(tiny_onnx, tmp_path, fake_registry):
    loose = dict(atol=100.0, rtol=1.0, min_cosine=0.0, min_snr_db=0.0)  # numerics let it pass
    report = _run(tiny_onnx, tmp_path, fake_registry, eval_data=_data(tmp_path),
                  extra={"fake": {"skew": 50.0}}, max_accuracy_drop=5.0, **loose)
    t = report.targets["fake"]
    assert t.accuracy["drop_points"] > 5.0 and not t.accuracy["passed"]
    assert t.status == "failed" and "accuracy: accuracy 0 vs the reference" in t.reason
    assert report.exit_code == 1


def test_embeddings_without_labels_compare_neighbours(tiny_onnx, tmp_path, fake_registry):
    report = _run(tiny_onnx, tmp_path, fake_registry, eval_data=_data(tmp_path, labels=False),
                  max_accuracy_drop=0.0)
    acc = report.targets["fake"].accuracy
    assert acc["metric"].startswith("top-5 neighbour agreement") and acc["target"] == 1.0


def test_eval_data_must_fit_the_validated_shapes(tiny_onnx, tmp_path, fake_registry):
    data = _data(tmp_path)
    with pytest.raises(UsageError, match="items of shape"):
        mtconvert.convert(tiny_onnx, targets=["fake"], out_dir=tmp_path / "o",
                          registry=fake_registry, eval_data=data,
                          input_shapes={"input_ids": "1x16"})
