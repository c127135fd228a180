"""Read the ML Program inside a saved ``.mlpackage``: operations, types and weights.

This reads the package's own files (the Core ML model protobuf and its weight blob), not the
PyTorch graph it came from and not coremltools' in-memory program: what is checked is what
ships. coremltools supplies only the protobuf classes and the blob-file reader.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.backends.coreml._ct import coremltools
from mtconvert.errors import ModelLoadError

# MIL DataType enum value -> numpy dtype name (sub-byte types unpack to (u)int8)
DTYPES = {1: "bool", 10: "float16", 11: "float32", 12: "float64", 21: "int8", 22: "int16",
          23: "int32", 24: "int64", 25: "int8", 31: "uint8", 32: "uint16", 33: "uint32",
          34: "uint64", 35: "uint8", 36: "uint8", 37: "uint8", 38: "uint8", 39: "uint8"}
SUB_BYTE_BITS = {25: 4, 35: 4, 36: 2, 37: 1, 38: 6, 39: 3}
_BLOB_READ = {37: "read_uint1_data", 36: "read_uint2_data", 39: "read_uint3_data",
              35: "read_uint4_data", 38: "read_uint6_data", 31: "read_uint8_data",
              25: "read_int4_data", 21: "read_int8_data", 32: "read_uint16_data",
              22: "read_int16_data", 10: "read_fp16_data", 11: "read_float_data",
              23: "read_int32_data", 33: "read_uint32_data"}


@dataclass(frozen=True)
class Var:
    """A typed value name: dtype is a numpy dtype name, shape has None for unknown dims."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    mil_type: int = 0


@dataclass
class Op:
    type: str
    # MIL parameter -> bindings, each ("name", var name) or ("value", constant)
    inputs: dict[str, list[tuple[str, Any]]]
    outputs: list[Var]
    attributes: dict[str, Any] = field(default_factory=dict)
    has_blocks: bool = False


@dataclass
class Program:
    opset: str
    inputs: list[Var]
    outputs: list[str]
    ops: list[Op]
    spec_version: int
    metadata: dict[str, str]

    @property
    def op_types(self) -> list[str]:
        return sorted({op.type for op in self.ops})


def model_path(package: Path) -> Path:
    """The root model file of an .mlpackage, as named by its Manifest.json."""
    manifest = package / "Manifest.json"
    if not manifest.is_file():
        raise ModelLoadError(f"{package.name} is not an .mlpackage (no Manifest.json)")
    data = json.loads(manifest.read_text())
    root = data.get("rootModelIdentifier")
    entry = data.get("itemInfoEntries", {}).get(root, {})
    path = package / "Data" / entry.get("path", "")
    if not entry or not path.is_file():
        raise ModelLoadError(f"{package.name}: Manifest.json names no readable root model")
    return path


def load_spec(package: Path) -> Any:
    coremltools()
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(model_path(package).read_bytes())
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelLoadError(f"{package.name}: unreadable Core ML model ({exc})") from None
    return spec


def op_counts(package: Path) -> tuple[str, Counter[str]]:
    """The main function's opset and operation histogram, from the protobuf alone (no weights
    read): what the lint needs."""
    block, opset = _main_block(load_spec(package), package)
    return opset, Counter(op.type for op in block.operations)


def _main_block(spec: Any, package: Path) -> tuple[Any, str]:
    if spec.WhichOneof("Type") != "mlProgram":
        raise ModelLoadError(f"{package.name} holds a {spec.WhichOneof('Type')} model, not an "
                             "ML Program")
    functions = spec.mlProgram.functions
    if "main" not in functions:
        raise ModelLoadError(f"{package.name}: the ML Program has no 'main' function")
    fn = functions["main"]
    opset = fn.opset or next(iter(fn.block_specializations))
    return fn.block_specializations[opset], opset


def load(package: Path) -> Program:
    spec = load_spec(package)
    block, opset = _main_block(spec, package)
    fn = spec.mlProgram.functions["main"]
    weights = _Weights(model_path(package).parent / "weights")
    return Program(opset=opset, inputs=[_var(v) for v in fn.inputs],
                   outputs=list(block.outputs), ops=[_op(o, weights) for o in block.operations],
                   spec_version=spec.specificationVersion,
                   metadata=dict(spec.description.metadata.userDefined))


def _var(named: Any) -> Var:
    t = named.type
    if t.WhichOneof("type") != "tensorType":
        return Var(named.name, t.WhichOneof("type") or "", (), 0)
    tt = t.tensorType
    shape = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None
                  for d in tt.dimensions)
    return Var(named.name, DTYPES.get(tt.dataType, f"mil-{tt.dataType}"), shape, tt.dataType)


def _op(spec: Any, weights: _Weights) -> Op:
    inputs = {}
    for param, arg in spec.inputs.items():
        inputs[param] = [("name", b.name) if b.WhichOneof("binding") == "name"
                         else ("value", value_of(b.value, weights)) for b in arg.arguments]
    attributes = {k: value_of(v, weights) for k, v in spec.attributes.items()}
    return Op(spec.type, inputs, [_var(v) for v in spec.outputs], attributes,
              has_blocks=len(spec.blocks) > 0)


def value_of(value: Any, weights: _Weights) -> Any:
    """A MIL Value: a numpy array for tensors (0-d for scalars), a str for string scalars."""
    vtype = value.type
    if vtype.WhichOneof("type") != "tensorType":
        raise ModelLoadError(f"constant of type {vtype.WhichOneof('type')} is not supported")
    tt = vtype.tensorType
    shape = tuple(d.constant.size for d in tt.dimensions)
    if value.WhichOneof("value") == "blobFileValue":
        return weights.read(value.blobFileValue, tt.dataType).reshape(shape)
    return _immediate(value.immediateValue.tensor, tt.dataType, shape)


def _immediate(tensor: Any, mil_type: int, shape: tuple[int, ...]) -> Any:
    kind = tensor.WhichOneof("value")
    if kind == "bytes":  # one bytes field, not a repeated one
        raw = [tensor.bytes.values]
    else:
        raw = list(getattr(tensor, kind).values) if kind else []
    if kind == "strings":
        return raw[0] if not shape and raw else np.array(raw, dtype=object).reshape(shape)
    dtype = DTYPES.get(mil_type)
    if dtype is None:
        raise ModelLoadError(f"constant of MIL data type {mil_type} is not supported")
    if kind == "bytes":
        data = raw[0] if raw else b""
        if mil_type in SUB_BYTE_BITS:
            return _unpack_bits(data, mil_type, int(np.prod(shape))).reshape(shape)
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    return np.array(raw, dtype=dtype).reshape(shape)


def _unpack_bits(data: bytes, mil_type: int, count: int) -> np.ndarray:
    coremltools()
    from coremltools.optimize import _utils as opt_utils

    signed = mil_type == 25
    values = np.frombuffer(data, dtype=np.int8 if signed else np.uint8)
    return opt_utils.restore_elements_from_packed_bits(values, SUB_BYTE_BITS[mil_type], count,
                                                       signed)


class _Weights:
    """The package's weight blob files, read with coremltools' blob-storage reader."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._readers: dict[str, Any] = {}

    def read(self, blob: Any, mil_type: int) -> np.ndarray:
        reader = self._reader(blob.fileName.split("/")[-1])
        method = _BLOB_READ.get(mil_type)
        if method is None:
            raise ModelLoadError(f"weights of MIL data type {mil_type} are not supported")
        data = np.asarray(getattr(reader, method)(blob.offset))
        if mil_type == 10:
            return np.frombuffer(data.tobytes(), np.float16).copy()
        return data.copy()

    def _reader(self, name: str) -> Any:
        if name not in self._readers:
            path = self.folder / name
            if not path.is_file():
                raise ModelLoadError(f"the package's weight file {name} is missing")
            coremltools()
            from coremltools.libmilstoragepython import _BlobStorageReader

            self._readers[name] = _BlobStorageReader(str(path))
        return self._readers[name]
