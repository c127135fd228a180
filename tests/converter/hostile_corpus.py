"""A generated corpus of broken and hostile model files. Each builder writes into a folder and
returns (model path, extra CLI args). Used by test_hostile.py."""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.models import tiny_encoder

MARKER = "PWNED-MARKER"


class Evil:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, folder: str):
        self.folder = folder

    def __reduce__(self):
        return (os.makedirs, (os.path.join(self.folder, MARKER),))


def _model(nodes, inputs, outputs, inits=(), opset=17, ir=8):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def _f(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _save(m, path: Path) -> Path:
    path.write_bytes(m.SerializeToString())
    return path


def relu(path: Path, shape=(1, 4)) -> Path:
    return _save(_model([helper.make_node("Relu", ["x"], ["y"])], [_f("x", shape)],
                        [_f("y", shape)]), path)


def build(folder: Path) -> dict[str, tuple[Path, list[str]]]:
    tiny = tiny_encoder(folder / "tiny_source.onnx")
    data = tiny.read_bytes()
    cases: dict[str, tuple[Path, list[str]]] = {}

    def raw(name: str, content: bytes, args: list[str] | None = None) -> None:
        (folder / name).write_bytes(content)
        cases[name] = (folder / name, args or [])

    raw("empty.onnx", b"")
    for frac in (0.01, 0.05, 0.1, 0.2, 0.33, 0.5, 0.66, 0.8, 0.9, 0.97):
        raw(f"truncated_{int(frac * 100):02d}.onnx", data[: int(len(data) * frac)])
    for i, off in enumerate((0, 1, 2, 3, 5, 8, 13, 21, 34, 55)):
        bad = bytearray(data)
        for j in range(off, off + 12):
            bad[j] ^= 0xA5
        raw(f"header_flip_{i}.onnx", bytes(bad))
    raw("text.onnx", b"this is a README, not a model\n" * 20)
    raw("garbage.onnx", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for name in ("model.txt", "model", "model.pb", "model.py"):
        raw(name, data)
    (folder / "adir.onnx").mkdir()
    cases["adir.onnx"] = (folder / "adir.onnx", [])
    cases["missing.onnx"] = (folder / "missing.onnx", [])
    _structural(folder, cases)
    _external(folder, cases)
    _pickles(folder, cases, tiny)
    cases["over_max_bytes.onnx"] = (tiny, ["--max-model-bytes", "100"])
    return cases


def _structural(folder: Path, cases: dict) -> None:
    def add(name, model, args=None):
        cases[name] = (_save(model, folder / name), args or [])

    add("missing_initializer.onnx",
        _model([helper.make_node("MatMul", ["x", "w_missing"], ["y"])], [_f("x", [1, 4])],
               [_f("y", [1, 4])]))
    unknown = _model([helper.make_node("Boom", ["x"], ["y"], domain="com.evil")],
                     [_f("x", [1, 4])], [_f("y", [1, 4])])
    unknown.opset_import.append(helper.make_opsetid("com.evil", 1))
    add("unknown_domain.onnx", unknown)
    add("opset_99.onnx", _model([helper.make_node("Relu", ["x"], ["y"])], [_f("x", [1, 4])],
                                [_f("y", [1, 4])], opset=99))
    add("cycle.onnx", _model([helper.make_node("Add", ["x", "b"], ["a"]),
                              helper.make_node("Relu", ["a"], ["b"])],
                             [_f("x", [1, 4])], [_f("a", [1, 4])]))
    add("absurd_shape.onnx", _model([helper.make_node("Relu", ["x"], ["y"])],
                                    [_f("x", [1, 1 << 40])], [_f("y", [1, 1 << 40])]))
    add("zero_dim.onnx", _model([helper.make_node("Relu", ["x"], ["y"])], [_f("x", [1, 0])],
                                [_f("y", [1, 0])]))
    add("nan_output.onnx", _model([helper.make_node("Abs", ["x"], ["a"]),
                                   helper.make_node("Neg", ["a"], ["n"]),
                                   helper.make_node("Sqrt", ["n"], ["y"])],
                                  [_f("x", [1, 4])], [_f("y", [1, 4])]))
    add("string_input.onnx", _model([helper.make_node("Identity", ["s"], ["y"])],
                                    [_f("s", [1], TensorProto.STRING)],
                                    [_f("y", [1], TensorProto.STRING)]))
    seq_in = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [4])
    add("sequence_input.onnx", _model([helper.make_node("SequenceLength", ["seq"], ["n"])],
                                      [seq_in], [_f("n", [], TensorProto.INT64)]))
    add("no_outputs.onnx", _model([helper.make_node("Relu", ["x"], ["y"])], [_f("x", [1, 4])], []))
    no_opset = _model([helper.make_node("Relu", ["x"], ["y"])], [_f("x", [1, 4])],
                      [_f("y", [1, 4])])
    del no_opset.opset_import[:]
    add("no_opset.onnx", no_opset)
    add("ir_version_0.onnx", _model([helper.make_node("Relu", ["x"], ["y"])], [_f("x", [1, 4])],
                                    [_f("y", [1, 4])], ir=0))
    good = relu(folder / "relu.onnx")
    np.savez(folder / "wrong_dtype.npz", x=np.zeros((1, 4), np.int64))
    cases["inputs_wrong_dtype"] = (good, ["--inputs", str(folder / "wrong_dtype.npz")])
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(folder / "objects.npz", "w") as z:
        z.write(folder / "objects.npy", "x.npy")
    cases["inputs_object_array"] = (good, ["--inputs", str(folder / "objects.npz")])
    cases["inputs_is_directory"] = (good, ["--inputs", str(folder)])
    cases["input_shape_absurd"] = (tiny_encoder(folder / "tiny_dyn.onnx"),
                                   ["--input-shape", "input_ids=100000x100000"])


def _external(folder: Path, cases: dict) -> None:
    for name, location in (("ext_missing.onnx", "weights.bin"),
                           ("ext_parent.onnx", "../secret.bin"),
                           ("ext_absolute.onnx", "/etc/passwd")):
        w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", "64")):
            entry = w.external_data.add()
            entry.key, entry.value = k, v
        m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_f("x", [1, 4])],
                   [_f("y", [1, 4])], inits=[w])
        cases[name] = (_save(m, folder / name), [])
    (folder.parent / "secret.bin").write_bytes(b"\0" * 64)


def _pickles(folder: Path, cases: dict, tiny: Path) -> None:
    import torch

    evil = pickle.dumps(Evil(str(folder)))
    for name in ("evil.pkl", "evil.pth", "evil.bin", "disguised_pickle.onnx"):
        (folder / name).write_bytes(evil)
        cases[name] = (folder / name, [])
    module = torch.nn.Linear(4, 2)
    torch.jit.save(torch.jit.script(module), str(folder / "scripted.pt"))
    cases["scripted.pt"] = (folder / "scripted.pt", [])
    torch.save(module, str(folder / "saved_module.pth"))
    cases["saved_module.pth"] = (folder / "saved_module.pth", [])
    cases["trusted_pickle_no_inputs"] = (folder / "scripted.pt", ["--trust-pickle"])
    src = Path(__file__).resolve().parents[2] / "fixtures" / "bert_distilled.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(folder / "pickled_weight.pt2", "w") as zout:
        for item in zin.namelist():
            content = zin.read(item)
            if item.endswith("_weights_config.json"):
                cfg = json.loads(content)
                next(iter(cfg["config"].values()))["use_pickle"] = True
                content = json.dumps(cfg).encode()
            zout.writestr(item, content)
    cases["pickled_weight.pt2"] = (folder / "pickled_weight.pt2", [])
    (folder / "garbage.pt2").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    cases["garbage.pt2"] = (folder / "garbage.pt2", [])
    (folder / "notzip.pt2").write_bytes(b"hello")
    cases["notzip.pt2"] = (folder / "notzip.pt2", [])
