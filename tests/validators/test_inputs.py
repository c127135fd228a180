import numpy as np
import pytest

from mtconvert.validators.inputs import (InputError, InputRequest, check_user_feeds, generate,
                                         guess_role)


def test_roles_from_names_and_dtypes():
    assert guess_role("input_ids", "int64") == "ids"
    assert guess_role("attention_mask", "int64") == "mask"
    assert guess_role("token_type_ids", "int64") == "token_type"
    assert guess_role("position_ids", "int32") == "position"
    assert guess_role("pixel_values", "float32") == "float"
    assert guess_role("flag", "bool") == "bool"
    assert guess_role("step", "int64") == "int"
    with pytest.raises(InputError, match="--inputs"):
        guess_role("text", "object")


def _bert_requests(high=30522, shape=(3, 16)):
    return [InputRequest("input_ids", shape, "int64", "ids", high),
            InputRequest("attention_mask", shape, "int64", "mask"),
            InputRequest("token_type_ids", shape, "int64", "token_type", 2)]


def test_ids_inside_vocab_and_mask_has_trailing_padding():
    feeds = generate(_bert_requests(high=100), seed=1)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 100
    assert mask[0].min() == 0, "first row must be padded"
    for row in mask:  # ones then zeros: never a one after a zero
        assert np.all(np.diff(row) <= 0) and row[0] == 1
    assert np.all(ids[mask == 0] == 0), "ids under padding are the pad id"
    assert set(np.unique(feeds["token_type_ids"])) <= {0, 1}


def test_same_seed_same_inputs_other_seed_differs():
    a, b, c = (generate(_bert_requests(), seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["input_ids"], c["input_ids"])


def test_float_and_position_inputs():
    feeds = generate([InputRequest("pixel_values", (2, 3, 8, 8), "float32", "float"),
                      InputRequest("position_ids", (2, 5), "int64", "position", 64)])
    assert feeds["pixel_values"].dtype == np.float32 and feeds["pixel_values"].std() > 0.5
    assert feeds["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2


def test_integer_without_table_stays_small():
    feeds = generate([InputRequest("step", (4,), "int64", "int")])
    assert feeds["step"].min() >= 0 and feeds["step"].max() < 2


def test_empty_shape_rejected():
    with pytest.raises(InputError, match="empty"):
        generate([InputRequest("x", (0, 4), "float32", "float")])


def test_user_feeds_checked_against_model():
    expected = {"input_ids": ("int64", (None, None)), "pixel": ("float32", (None, 3))}
    good = {"input_ids": np.zeros((1, 4), np.int32), "pixel": np.zeros((2, 3), np.float32)}
    check_user_feeds(good, expected)
    with pytest.raises(InputError, match="lacks pixel"):
        check_user_feeds({"input_ids": good["input_ids"]}, expected)
    with pytest.raises(InputError, match="shape"):
        check_user_feeds(good | {"pixel": np.zeros((2, 4), np.float32)}, expected)
    with pytest.raises(InputError, match="dtype"):
        check_user_feeds(good | {"input_ids": np.zeros((1, 4), np.float32)}, expected)
