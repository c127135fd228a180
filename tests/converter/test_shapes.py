import pytest

from mtconvert.backends.base import TensorSpec
from mtconvert.errors import UsageError
from mtconvert.shapes import DEFAULT_AXIS, parse_shape_spec, resolve_shapes

BERT = (TensorSpec("input_ids", ("batch", "sequence"), "int64"),
        TensorSpec("attention_mask", ("batch", "sequence"), "int64"))


@pytest.mark.parametrize("text,expected", [("input_ids=1x128", ("input_ids", (1, 128))),
                                           ("x=2,3,4", ("x", (2, 3, 4))), ("a.b:0=7", ("a.b:0", (7,)))])
def test_parse(text, expected):
    assert parse_shape_spec(text) == expected


@pytest.mark.parametrize("text", ["input_ids", "input_ids=", "x=1xa", "=1x2", "x=0x4", "x=-1"])
def test_parse_rejects(text):
    with pytest.raises(UsageError, match="--input-shape"):
        parse_shape_spec(text)


def test_named_axis_follows_to_other_inputs():
    shapes, notes = resolve_shapes(BERT, {"input_ids": (2, 64)})
    assert shapes == {"input_ids": (2, 64), "attention_mask": (2, 64)} and notes == []


def test_defaults_are_stated():
    shapes, notes = resolve_shapes(BERT, {})
    assert shapes["input_ids"] == (1, DEFAULT_AXIS)
    assert any("sequence" in n and "default" in n for n in notes)


def test_conflicts_and_unknown_names():
    fixed = (TensorSpec("pixel", (1, 3, 32, 32), "float32"),)
    with pytest.raises(UsageError, match="conflicts"):
        resolve_shapes(fixed, {"pixel": (1, 3, 64, 64)})
    with pytest.raises(UsageError, match="rank"):
        resolve_shapes(fixed, {"pixel": (1, 3)})
    with pytest.raises(UsageError, match="unknown input nope"):
        resolve_shapes(fixed, {"nope": (1,)})
