"""ncnn int8 layers holding a quantized source's own ints and scales (issue 20).

pnnx writes the float .param/.bin of the dequantized graph (``backends.lowering.dequantize``);
this rewrites the weight layers whose float weights are exactly a source int8 weight (matched
by value against the weights' record, never by name) into ncnn's int8 form, as ncnn's own
``ncnn2int8`` tool writes it (src/modelbin.cpp, src/layer/{gemm,innerproduct,embed}.cpp):

- the weight blob: tag 0x000D4B38, then the int8 values (padded to 4 bytes);
- ncnn's scales are ONNX's reciprocals (``q = x * scale``), symmetric (zero point 0);
- ``Gemm`` with a constant B (pnnx's Linear on a [seq, hidden] blob): ``18=2``, one scale for
  B (per-tensor weights only); ncnn quantizes the A input per row at run time (absmax), so no
  activation scale is needed, for a dynamic source as for a QDQ one;
- ``InnerProduct``: ``8=2``, a scale per output channel (per-tensor or per-output-channel
  weights), then the input (bottom blob) scale: the source's activation QuantizeLinear scale
  (QDQ). ncnn's int8 is symmetric: an asymmetric source activation (a non-zero zero point)
  gets the symmetric scale covering the source's whole representable range,
  ``127 / max(|(qmin - zp) s|, |(qmax - zp) s|)`` (a step at most 2x the source's; the run's
  int8-source profile judges it). A dynamic source has no activation scale: with
  ``--calibration`` the input scale is 127 / absmax of that input over the calibration items
  (``calibrate``, ncnn2table's absmax method), else the layer stays fp32, named in the steps;
- a per-channel ``Gemm`` (Gemm holds one B scale): the source's ints under the B scale 1
  (ncnn's descale absmax / (127 B scale) stays exact), then a BinaryOp multiplying column j by
  the source's s_j (a MemoryData) and one adding the bias (the C blob moved into a MemoryData):
  ncnn's x86 int8 Gemm kernel is much faster than its InnerProduct int8 on a [seq, hidden] blob,
  which an earlier Gemm -> InnerProduct rewrite ran into (benchmarks/bench_ncnn_int8.py);
- ``Embed``: ``18=2``, one scale (per-tensor); a uint8 table with a zero point is stored as its
  ints minus 128 with the offset added through the layer's bias.

A weight whose ints, minus their zero point, do not fit int8, or whose scales ncnn's layer
cannot hold, stays fp32, named in the steps. The .bin is walked layer by layer (``blobs``: what
each layer type loads); a layer type of unknown layout leaves the model fp32, said so. A float
model at ``--precision int8`` gets its own weights quantized the ncnn2int8 way (``_own_record``)
and calibrated input scales.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INT8_TAG = struct.pack("<I", 0x000D4B38)
FLOAT_FLAG = b"\0\0\0\0"
QUANTIZE_TERM = "2"  # what ncnn2int8 writes into int8_scale_term / quantize_term
# (type, name, bottoms, tops, params) per .param layer line, as backends.ncnn reads them
Layer = tuple[str, str, list[str], list[str], list[str]]
# layer types that load nothing from the .bin
WEIGHTLESS = frozenset({
    "Input", "Split", "Concat", "Slice", "BinaryOp", "UnaryOp", "Reshape", "Permute", "Flatten",
    "Crop", "Softmax", "GELU", "TanH", "Sigmoid", "ReLU", "Swish", "Erf", "MatMul", "Squeeze",
    "ExpandDims", "Eltwise", "Noop", "Clip", "Reduction", "Dropout", "Interp", "Pooling",
    "Padding", "Tile", "Cast", "Mish", "HardSigmoid", "HardSwish", "ELU", "Exp", "Log",
    "Power", "SDPA", "Shrink", "Gather", "CumulativeSum", "CopyTo", "Fold", "Unfold",
    "PixelShuffle", "Reorg", "ShuffleChannel", "Dequantize", "Quantize", "Requantize", "Threshold",
    "AbsVal", "BNLL", "Bias", "Spectrogram"})
GEMM_C = {0: lambda m, n: 1, 1: lambda m, n: m, 2: lambda m, n: m, 3: lambda m, n: m * n,
          4: lambda m, n: n}


@dataclass
class Blob:
    role: str      # "weight", "bias", "C", "A", "gamma", "beta", "data"
    count: int     # float32 values
    flagged: bool  # ModelBin type 0: a 4-byte flag first
    offset: int = 0

    @property
    def size(self) -> int:
        return 4 * self.count + (4 if self.flagged else 0)


@dataclass
class Result:
    int8: list[str] = field(default_factory=list)        # "name (Type)" made int8
    kept_float: list[str] = field(default_factory=list)  # "name (Type): why"
    steps: list[str] = field(default_factory=list)


def params(raw: list[str]) -> dict[str, str]:
    return dict(p.split("=", 1) for p in raw if "=" in p)


def _i(p: dict[str, str], key: str, default: int = 0) -> int:
    return int(float(p.get(key, default)))


def blobs(kind: str, p: dict[str, str]) -> list[Blob] | None:
    """The blobs a layer of this type loads from the .bin, in order (float32 .bin as pnnx
    writes it); None for a layer type whose layout is not known here."""
    if kind in WEIGHTLESS:
        return []
    if kind == "InnerProduct":
        return [Blob("weight", _i(p, "2"), True)] + \
            ([Blob("bias", _i(p, "0"), False)] if _i(p, "1") else [])
    if kind == "Embed":
        return [Blob("weight", _i(p, "3"), True)] + \
            ([Blob("bias", _i(p, "0"), False)] if _i(p, "2") else [])
    if kind == "Gemm":
        m, n, k = _i(p, "7"), _i(p, "8"), _i(p, "9")
        out = [Blob("A", m * k, True)] if _i(p, "4") else []
        out += [Blob("weight", n * k, True)] if _i(p, "5") else []
        bct = _i(p, "10")
        if _i(p, "6") and bct != -1:
            out.append(Blob("C", GEMM_C[bct](m, n), True))
        return out
    if kind == "MemoryData":
        dims = [_i(p, key) for key in ("0", "1", "11", "2") if _i(p, key)]
        return [Blob("data", int(np.prod(dims)) if dims else 1, _i(p, "21", 1) == 0)]
    if kind == "LayerNorm":
        return [Blob("gamma", _i(p, "0"), False), Blob("beta", _i(p, "0"), False)] \
            if _i(p, "2", 1) else []
    return None


def layout(layers: list[Layer], bin_size: int) -> list[list[Blob]] | str:
    """Each layer's blobs with their offsets, or why the .bin cannot be walked."""
    out, offset = [], 0
    for kind, name, _, _, raw in layers:
        found = blobs(kind, params(raw))
        if found is None:
            return f"layer type {kind} ({name}): its .bin layout is not known to mtconvert"
        for b in found:
            b.offset, offset = offset, offset + b.size
        out.append(found)
    if offset != bin_size:
        return f"the .bin holds {bin_size} bytes, the layers' layout {offset}"
    return out


def _floats(data: bytes, blob: Blob) -> np.ndarray | None:
    start = blob.offset + (4 if blob.flagged else 0)
    if blob.flagged and data[blob.offset:start] != FLOAT_FLAG:
        return None  # not plain fp32 (fp16 or already int8)
    return np.frombuffer(data, np.float32, blob.count, start)


def _match(w: np.ndarray, shape: tuple[int, int], records: list[dict[str, Any]]
           ) -> tuple[dict[str, Any], bool] | None:
    """The record whose float values are ``w`` (viewed as ``shape``), and whether the layer
    holds them transposed."""
    from mtconvert.backends.lowering.dequantize import values

    w2 = w.reshape(shape)
    for r in records:
        v = values(r)
        if v.ndim != 2:
            continue
        if v.T.shape == shape and np.array_equal(v.T, w2):
            return r, True
        if v.shape == shape and np.array_equal(v, w2):
            return r, False
    return None


def _symmetric(r: dict[str, Any], transposed: bool) -> np.ndarray | None:
    """The record's ints minus their zero point, in the layer's layout, if they fit int8."""
    ints = np.asarray(r["ints"], np.int64).reshape(r["shape"])
    if r["zero_point"]:
        zero = np.asarray(r["zero_point"], np.int64)
        if zero.size > 1:
            shape = [1] * ints.ndim
            shape[r["axis"] % ints.ndim] = zero.size
            zero = zero.reshape(shape)
        ints = ints - zero
    if ints.min() < -128 or ints.max() > 127:
        return None
    return (ints.T if transposed else ints).astype(np.int8)


def _output_scales(r: dict[str, Any], transposed: bool, n_out: int) -> np.ndarray | None:
    """ONNX weight scales per output channel of an [n_out, k] layer weight, or None."""
    scale = np.asarray(r["scale"], np.float32)
    if scale.size == 1:
        return np.full(n_out, scale[0], np.float32)
    out_axis = 1 if transposed else 0  # the record's axis that is the layer's output
    if scale.size == n_out and r["axis"] is not None and r["axis"] % 2 == out_axis:
        return scale
    return None


def input_scale(q: dict[str, Any]) -> float:
    """ncnn's symmetric bottom-blob scale for a source activation quantization
    ({scale, zero_point, dtype}): exact when the zero point is 0 (int8), else the symmetric
    range that covers the source's whole representable range."""
    lo, hi = (0, 255) if q["dtype"] == "uint8" else (-128, 127)
    if q["zero_point"] == 0 and q["dtype"] == "int8":
        return 1.0 / q["scale"]
    reach = max(abs(lo - q["zero_point"]), abs(hi - q["zero_point"])) * q["scale"]
    return 127.0 / reach


def _pack(ints: np.ndarray) -> bytes:
    raw = ints.astype(np.int8).tobytes()
    return INT8_TAG + raw + b"\0" * (-len(raw) % 4)


@dataclass
class Plan:
    weight: bytes                     # the int8 weight blob
    tail: bytes                       # the scales, after the layer's other blobs
    changes: dict[str, str]           # .param keys set
    bias_add: np.ndarray | None = None  # added to the layer's bias (created if absent)
    record: dict[str, Any] = field(default_factory=dict)
    scaled: tuple[np.ndarray, bool] | None = None  # a per-channel Gemm: (ONNX scales, bias?)


def _plan(kind: str, p: dict[str, str], w: np.ndarray,
          by_size: dict[int, list[dict[str, Any]]] | None,
          absmax: float | None = None) -> Plan | str:
    """How one weight layer becomes int8, or why it stays fp32. ``by_size`` None: a float
    source's own weights, quantized here (``_own_record``)."""
    if kind == "Gemm":
        n, k = _i(p, "8"), _i(p, "9")
        shape = (n, k) if _i(p, "3") else (k, n)
        n_out = n
    elif kind == "InnerProduct":
        n_out = _i(p, "0")
        shape = (n_out, w.size // max(n_out, 1))
    else:  # Embed
        n_out = _i(p, "0")
        shape = (_i(p, "1"), n_out)
    hit = _match(w, shape, by_size.get(w.size, [])) if by_size is not None else \
        (_own_record(kind, w.reshape(shape)), False)
    if hit is None:
        return "its float weights are no source int8 weight"
    r, transposed = hit
    ints = _symmetric(r, transposed)
    if ints is None and kind == "Embed" and r["dtype"] == "uint8" and len(r["zero_point"]) == 1:
        return _shifted_table(r, n_out)
    if ints is None:
        return "the source's ints minus their zero point do not fit int8"
    scale = np.asarray(r["scale"], np.float32)
    per_channel = not np.all(scale == scale.flat[0])
    if kind == "Gemm" and per_channel:
        return _scaled_gemm(p, r, ints, transposed, n_out)
    if kind == "InnerProduct":
        return _inner_product(kind, p, r, ints, transposed, n_out, absmax)
    return Plan(_pack(ints), np.float32(1.0 / scale.flat[0]).tobytes(), {"18": QUANTIZE_TERM},
                record=r)


def _own_record(kind: str, w: np.ndarray) -> dict[str, Any]:
    """A float weight (in the layer's layout) quantized the way ncnn2int8 does: symmetric,
    absmax / 127 per output channel for an InnerProduct, per tensor for the layers that hold
    one scale (Gemm, Embed)."""
    from mtconvert.backends.lowering.dequantize import record

    absmax = np.abs(w).max(axis=1) if kind == "InnerProduct" else np.abs(w).max(keepdims=True)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    ints = np.clip(np.round(w / (scale[:, None] if scale.size > 1 else scale)), -127, 127)
    return record(ints.astype(np.int8), scale, None, 0 if scale.size > 1 else None) | \
        {"own": True}


def _inner_product(kind: str, p: dict[str, str], r: dict[str, Any], ints: np.ndarray,
                   transposed: bool, n_out: int, absmax: float | None = None) -> Plan | str:
    """An InnerProduct's int8 form: a scale per output channel and the input's scale."""
    scales = _output_scales(r, transposed, n_out)
    if scales is None:
        return "per-channel scales along its input axis"
    if not r.get("input") and not absmax:
        why = "no calibration" if r.get("own") else \
            "no activation scale in the source (dynamic quantization)"
        return f"{why} for its input" + ("" if absmax is None else
                                         " and its calibration input was all zeros")
    x_scale = input_scale(r["input"]) if r.get("input") else 127.0 / absmax
    tail = (1.0 / scales).astype(np.float32).tobytes() + np.float32(x_scale).tobytes()
    return Plan(_pack(ints), tail, {"8": QUANTIZE_TERM}, record=r)


# a Gemm whose output is its A·B (+ C): alpha 1, A not constant nor transposed, B constant,
# the plain [M, N] output layout (parameter: value when absent)
_PLAIN_GEMM = {"0": 1.0, "2": 0, "4": 0, "5": 1, "11": 0, "12": 0, "13": 0, "14": 0}


def _scaled_gemm(p: dict[str, str], r: dict[str, Any], ints: np.ndarray, transposed: bool,
                 n_out: int) -> Plan | str:
    """A Gemm with per-output-channel weight scales s_j (ncnn's Gemm int8 holds one B scale):
    the Gemm keeps ncnn's fast int8 kernel on the source's ints under the B scale 1 (its
    output descale, absmax / (127 B scale), stays exact), and writes A·qᵀ; a BinaryOp
    multiplies column j by s_j (a MemoryData holding the source's scales) and a second adds the
    bias (the C blob, moved into a MemoryData), so C is never divided by s_j."""
    # the layer's layout is [N, K] with transB (3=1), else [K, N]
    scales = _output_scales(r, transposed == bool(_i(p, "3")), n_out)
    if scales is None:
        return "per-channel scales along its input axis"
    bct = _i(p, "10") if _i(p, "6") else -1
    if any(float(p.get(k, 1.0 if k == "0" else 0)) != v for k, v in _PLAIN_GEMM.items()) or \
            bct not in (-1, 4) or bct == 4 and float(p.get("1", 1.0)) != 1.0:
        return "per-channel scales (Gemm holds one weight scale; not a plain A·B + bias)"
    return Plan(_pack(ints), np.float32(1.0).tobytes(), {"18": QUANTIZE_TERM, "6": "0"},
                record=r, scaled=(scales, bct == 4))


def _scale_layers(name: str, top: str, n: int, bias: bool) -> list[str]:
    """The .param lines after a per-channel Gemm (``_scaled_gemm``) whose output blob became
    ``top``_q: MemoryData scales, BinaryOp mul (op 2), [MemoryData bias, BinaryOp add (op 0)]."""
    mul_top = f"{top}_m" if bias else top
    out = [f"MemoryData {name}_s 0 1 {name}_s 0={n}",
           f"BinaryOp {name}_mul 2 1 {top}_q {name}_s {mul_top} 0=2"]
    if bias:
        out += [f"MemoryData {name}_b 0 1 {name}_b 0={n}",
                f"BinaryOp {name}_add 2 1 {mul_top} {name}_b {top} 0=0"]
    return out


def _shifted_table(r: dict[str, Any], n_out: int) -> Plan:
    """A uint8 table with a zero point (ORT's quantize_dynamic embeddings): ncnn's int8 Embed
    is symmetric, so it stores the source's ints minus 128 (the same ints, as int8) and adds
    (128 - zero point) * scale through the layer's bias: (u - 128) s + (128 - zp) s."""
    ints = (np.asarray(r["ints"], np.int64).reshape(r["shape"]) - 128).astype(np.int8)
    scale = np.float32(r["scale"][0])
    shift = np.full(n_out, np.float32(128 - r["zero_point"][0]) * scale, np.float32)
    return Plan(_pack(ints), np.float32(1.0 / scale).tobytes(), {"2": "1", "18": QUANTIZE_TERM},
                bias_add=shift, record=r)


def rewrite(param: Path, binf: Path, layers: list[Layer],
            records: dict[str, dict[str, Any]] | None,
            input_absmax: dict[str, float] | None = None) -> Result:
    """Rewrite ``param``/``binf`` in place; the result names what became int8 and what stayed
    fp32 and why. Nothing is written when no layer becomes int8. ``input_absmax``: blob ->
    largest |value| over calibration data (``calibrate``), the input scale (127 / absmax,
    ncnn2table's absmax method) of an InnerProduct the source gives none. ``records`` None:
    a float source, its own weights quantized (``_own_record``)."""
    res = Result()
    data = binf.read_bytes()
    walked = layout(layers, len(data))
    if isinstance(walked, str):
        res.steps.append(f"int8: {walked}: the model stays fp32")
        return res
    by_size: dict[int, list[dict[str, Any]]] | None = None if records is None else {}
    for r in (records or {}).values():
        by_size.setdefault(int(np.prod(r["shape"])), []).append(r)
    out, lines = bytearray(), param.read_text().splitlines()
    used: list[int] = []
    asymmetric = 0
    added = 0  # layers after scaled Gemms, each making one new blob
    for i, ((kind, name, bottoms, tops, raw), found) in enumerate(zip(layers, walked)):
        absmax = (input_absmax or {}).get(bottoms[0]) if bottoms else None
        plan = _layer_plan(kind, params(raw), found, data, by_size, absmax)
        if isinstance(plan, str):
            if plan:
                res.kept_float.append(f"{name} ({kind}): {plan}")
            out += b"".join(data[b.offset:b.offset + b.size] for b in found)
            continue
        for b in found:
            if b.role == "weight":
                out += plan.weight
            elif b.role == "bias" and plan.bias_add is not None:
                out += (_floats(data, b) + plan.bias_add).astype(np.float32).tobytes()
            elif b.role != "C" or not plan.scaled:  # a scaled Gemm's C: a MemoryData after
                out += data[b.offset:b.offset + b.size]
        if plan.bias_add is not None and not any(b.role == "bias" for b in found):
            out += plan.bias_add.tobytes()
        out += plan.tail
        extra: list[str] = []
        if plan.scaled:  # the MemoryData layers' data (raw floats) follow the Gemm's
            scales, bias = plan.scaled
            out += scales.astype(np.float32).tobytes()
            out += b"".join(_floats(data, b).tobytes() for b in found if b.role == "C")
            extra = _scale_layers(name, tops[0], len(scales), bias)
            tops = [f"{tops[0]}_q"]
            added += len(extra)  # one new blob per added layer
        lines[2 + i] = "\n".join([" ".join([kind, name, str(len(bottoms)), str(len(tops)),
                                            *bottoms, *tops, *_set(raw, plan.changes)]), *extra])
        res.int8.append(f"{name} ({kind}{' x channel scales' if plan.scaled else ''})")
        q = plan.record.get("input") if kind == "InnerProduct" else None
        asymmetric += bool(q and (q["zero_point"] or q["dtype"] != "int8"))
        used.append(id(plan.record))
    folded = len(records or {}) - len(set(used)) - sum(
        1 for k in res.kept_float if "no source int8 weight" not in k)
    if folded > 0:
        res.kept_float.append(f"{folded} source int8 weight(s) are no ncnn layer's weight (the "
                              "converter folded them into float constants, e.g. MemoryData)")
    if asymmetric:
        res.steps.append(f"int8: {asymmetric} InnerProduct input(s) quantized asymmetrically in "
                         "the source (zero point != 0): ncnn's symmetric scale covers the source's "
                         "whole range (a step up to 2x the source's)")
    if res.int8:
        n_layers, n_blobs = map(int, lines[1].split()[:2])
        lines[1] = f"{n_layers + added} {n_blobs + added}"
        binf.write_bytes(bytes(out))
        param.write_text("\n".join(lines) + "\n")
    return res


def _layer_plan(kind: str, p: dict[str, str], found: list[Blob], data: bytes,
                by_size: dict[int, list[dict[str, Any]]] | None,
                absmax: float | None) -> Plan | str:
    """"" for a layer with no weight to quantize."""
    weight = next((b for b in found if b.role == "weight"), None)
    if kind not in ("Gemm", "InnerProduct", "Embed") or weight is None or \
            (kind == "Gemm" and _i(p, "4")):
        return ""
    w = _floats(data, weight)
    if w is None:
        return "its weights are not stored as fp32"
    return _plan(kind, p, w, by_size, absmax)


def _set(raw: list[str], changes: dict[str, str]) -> list[str]:
    kept = [x for x in raw if x.split("=", 1)[0] not in changes]
    return kept + [f"{k}={v}" for k, v in changes.items()]


def is_int8(kind: str, raw: list[str]) -> bool:
    """Does this .param layer hold int8 weights (ncnn2int8's and this module's form)?"""
    p = params(raw)
    return kind in ("Gemm", "Embed") and p.get("18") == QUANTIZE_TERM or \
        kind == "InnerProduct" and p.get("8") == QUANTIZE_TERM


def int8_tensors(param: Path, layers: list[Layer]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The int8 weights of an ncnn model read back from its .bin: (ints in the layer's layout,
    ONNX-convention scales: the reciprocals of ncnn's; for a Gemm whose output is multiplied by
    a MemoryData (``_scaled_gemm``), those values over its B scale), for ``compressed.kept``."""
    data = param.with_suffix(".bin").read_bytes()
    out, memory, offset = [], {}, 0
    for kind, _, _, tops, raw in layers:
        p = params(raw)
        found = blobs(kind, p)
        if found is None:
            raise ValueError(f"layer type {kind}: .bin layout unknown")
        quantized = is_int8(kind, raw)
        for b in found:
            b.offset = offset
            if quantized and b.role == "weight":
                ints = np.frombuffer(data, np.int8, b.count, offset + 4).copy()
                offset += 4 + b.count + (-b.count % 4)
            else:
                offset += b.size
        if kind == "MemoryData" and found:
            memory[tops[0]] = _floats(data, found[0])
        if quantized:
            n = _i(p, "0") if kind == "InnerProduct" else 1
            scales = np.frombuffer(data, np.float32, n, offset)
            offset += 4 * n + (4 if kind == "InnerProduct" else 0)
            n_out = _i(p, "0") if kind != "Gemm" else _i(p, "8")
            shape = (n_out, -1) if kind != "Embed" else (_i(p, "1"), n_out)
            if kind == "Gemm" and not _i(p, "3"):
                shape = (-1, n_out)
            out.append((ints.reshape(shape), (1.0 / scales).astype(np.float32), tops[0]))
    return [(ints, _channel_scales(top, layers, memory, scales)) for ints, scales, top in out]


def _channel_scales(top: str, layers: list[Layer], memory: dict[str, np.ndarray],
                    scales: np.ndarray) -> np.ndarray:
    """The weight scales of the int8 layer writing ``top``: ``scales``, times the MemoryData a
    BinaryOp multiplies its output by (op 2), if one does."""
    for kind, _, bottoms, _, raw in layers:
        if kind == "BinaryOp" and params(raw).get("0") == "2" and top in bottoms:
            other = [b for b in bottoms if b != top]
            if len(other) == 1 and other[0] in memory:
                return (memory[other[0]] * scales).astype(np.float32)
    return scales


def calibrate(job: dict[str, Any]) -> dict[str, Any]:
    """Child side (``python -m mtconvert.backends.ncnn_int8 JOB``; ncnn may crash): the
    largest |value| of each of ``job["blobs"]`` when the fp32 model runs the calibration items
    (``job["calibration"]``: .npz keyed by the source's input names, items along the first axis
    after reshaping to the converted shape ``job["shapes"]``)."""
    import ncnn

    net = ncnn.Net()
    net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
    net.opt.use_fp16_packed = net.opt.use_bf16_storage = False
    if net.load_param(job["param"]) != 0 or net.load_model(job["bin"]) != 0:
        raise RuntimeError("ncnn could not load the model")
    data = np.load(job["calibration"])
    items = {name: np.asarray(data[name]).reshape(-1, *job["shapes"][name])
             for _, name, _ in job["inputs"]}
    count = min(len(v) for v in items.values())
    absmax = dict.fromkeys(job["blobs"], 0.0)
    for i in range(count):
        ex = net.create_extractor()
        ex.set_light_mode(False)  # keep every blob: light mode frees a consumed one
        for blob, name, dtype in job["inputs"]:
            value = np.ascontiguousarray(items[name][i], np.int32 if dtype.startswith("int")
                                         else np.float32)
            ex.input(blob, ncnn.Mat(value, batch_index=0).clone())
        for blob in job["blobs"]:
            ret, mat = ex.extract(blob)
            if ret == 0:
                absmax[blob] = max(absmax[blob], float(np.abs(np.array(mat.numpy())).max()))
    return {"absmax": absmax, "samples": count}


if __name__ == "__main__":
    from mtconvert.backends.process import child_main

    child_main(calibrate)
