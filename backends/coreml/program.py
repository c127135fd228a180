"""Read the ML Program inside a saved ``.mlpackage``: operations, types and weights.

This reads the package's own files (the Core ML model protobuf and its weight blob), not the
PyTorch graph it came from and not coremltools' in-memory program: what is checked is what
ships. coremltools supplies only its generated protobuf classes, loaded from its folder
without importing the coremltools package (``_ct.proto``: importing coremltools costs seconds
and pulls torch). The weight blob file is read here with NumPy (the MIL blob storage format:
a 64-byte header, then per blob a 64-byte metadata record and the data, 64-byte aligned).
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.backends.coreml._ct import proto
from mtconvert.errors import ModelLoadError

# MIL DataType enum value -> numpy dtype name (sub-byte types unpack to (u)int8)
DTYPES = {1: "bool", 10: "float16", 11: "float32", 12: "float64", 21: "int8", 22: "int16",
          23: "int32", 24: "int64", 25: "int8", 31: "uint8", 32: "uint16", 33: "uint32",
          34: "uint64", 35: "uint8", 36: "uint8", 37: "uint8", 38: "uint8", 39: "uint8"}
SUB_BYTE_BITS = {25: 4, 35: 4, 36: 2, 37: 1, 38: 6, 39: 3}
SIGNED_SUB_BYTE = {25}  # int4
# MIL DataType -> the weight file's BlobDataType (MILBlob/Blob/BlobDataType.hpp) and the
# little-endian numpy dtype of its data (sub-byte types: packed bytes)
_BLOB_TYPES = {10: (1, "<f2"), 11: (2, "<f4"), 31: (3, "u1"), 21: (4, "i1"), 22: (6, "<i2"),
               32: (7, "<u2"), 25: (8, "u1"), 37: (9, "u1"), 36: (10, "u1"), 35: (11, "u1"),
               39: (12, "u1"), 38: (13, "u1"), 23: (14, "<i4"), 33: (15, "<u4")}
_BLOB_SENTINEL = 0xDEADBEEF
# storage_header: uint32 count, uint32 version, 7 x uint64 reserved (64 bytes)
# blob_metadata: uint32 sentinel, uint32 mil_dtype, uint64 sizeInBytes, uint64 offset,
#                uint64 padding_size_in_bits, 4 x uint64 reserved (64 bytes)
_HEADER = struct.Struct("<II")
_METADATA = struct.Struct("<IIQQQ")


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
    # the function's state inputs (iOS18+: read_state / coreml_update_state), typed by the
    # tensor each wraps; the runtime holds them between predictions
    states: list[Var] = field(default_factory=list)

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
    """The package's root Core ML model (``Model_pb2.Model``), parsed with coremltools'
    generated classes but without importing coremltools."""
    spec = proto("Model_pb2").Model()
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
    stateful = {v.name for v in fn.inputs if v.type.WhichOneof("type") == "stateType"}
    return Program(opset=opset, inputs=[_var(v) for v in fn.inputs if v.name not in stateful],
                   outputs=list(block.outputs), ops=[_op(o, weights) for o in block.operations],
                   spec_version=spec.specificationVersion,
                   metadata=dict(spec.description.metadata.userDefined),
                   states=[_var(v) for v in fn.inputs if v.name in stateful])


def _var(named: Any) -> Var:
    t = named.type
    if t.WhichOneof("type") == "stateType":  # typed by the tensor it holds
        t = t.stateType.wrappedType
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


def _unpack_bits(data: bytes | np.ndarray, mil_type: int, count: int) -> np.ndarray:
    """``count`` sub-byte values packed least significant bit first, byte after byte (as
    coremltools packs them: an element may straddle two bytes); int4 sign-extended into
    int8, the unsigned types as uint8."""
    nbits = SUB_BYTE_BITS[mil_type]
    packed = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    bits = np.unpackbits(packed.astype(np.uint8, copy=False), bitorder="little")
    if bits.size < count * nbits:
        raise ModelLoadError(f"{count} values of {nbits} bits need {count * nbits} bits, "
                             f"the data holds {bits.size}")
    values = np.packbits(bits[:count * nbits].reshape(count, nbits), axis=-1,
                         bitorder="little").reshape(count)
    if mil_type in SIGNED_SUB_BYTE:  # two's complement in nbits
        wide = values.astype(np.int16)
        return (wide - (wide >= 1 << (nbits - 1)) * (1 << nbits)).astype(np.int8)
    return values


class _Weights:
    """The package's weight blob files (MIL blob storage, version 2), each read once into
    memory; a blob is a read-only NumPy view of it (sub-byte types unpacked)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files: dict[str, bytes] = {}

    def read(self, blob: Any, mil_type: int) -> np.ndarray:
        name = blob.fileName.split("/")[-1]
        data = self._file(name)
        kind = _BLOB_TYPES.get(mil_type)
        if kind is None:
            raise ModelLoadError(f"weights of MIL data type {mil_type} are not supported")
        at = int(blob.offset)
        if at < _HEADER.size or at + 64 > len(data):
            raise ModelLoadError(f"{name}: no blob metadata at offset {at}")
        sentinel, blob_type, size, offset, padding = _METADATA.unpack_from(data, at)
        if sentinel != _BLOB_SENTINEL:
            raise ModelLoadError(f"{name}: invalid blob metadata at offset {at}")
        if blob_type != kind[0]:
            raise ModelLoadError(f"{name}: the blob at offset {at} holds data type {blob_type}, "
                                 f"the program reads MIL data type {mil_type}")
        if offset + size > len(data):
            raise ModelLoadError(f"{name}: the blob at offset {at} runs past the file's end")
        raw = np.frombuffer(data, dtype=kind[1], count=size // np.dtype(kind[1]).itemsize,
                            offset=offset)
        if mil_type in SUB_BYTE_BITS:
            return _unpack_bits(raw, mil_type, (size * 8 - padding) // SUB_BYTE_BITS[mil_type])
        return raw.astype(DTYPES[mil_type], copy=False)  # native byte order

    def _file(self, name: str) -> bytes:
        if name not in self._files:
            path = self.folder / name
            if not path.is_file():
                raise ModelLoadError(f"the package's weight file {name} is missing")
            data = path.read_bytes()
            if len(data) < 64 or _HEADER.unpack_from(data, 0)[1] != 2:
                raise ModelLoadError(f"the package's weight file {name} is not MIL blob "
                                     "storage version 2")
            self._files[name] = data
        return self._files[name]
