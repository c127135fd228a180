"""ncnn speed rewrites of a pnnx .param, each kept only when ncnn still agrees with ONNX Runtime.

``sdpa``: pnnx writes a transformer's attention as ``Q*s``, ``Kᵀ*s``, ``MatMul``, ``+ mask``,
``Softmax``, ``MatMul`` on [heads, seq, dim] blobs. ncnn's batched MatMul runs those products
head by head on a slow path (on a 6-layer 384-wide BERT at sequence 128 the 12 attention
MatMuls were a third of ncnn's time). ncnn's ``SDPA`` layer (no weights: Q, K, V and an
optional additive mask in, ``softmax(Q·Kᵀ·scale + mask)·V`` out, on its Gemm kernels) computes
the same thing; the rewrite is .param-only (the .bin is untouched): the key's ``Permute`` to
Kᵀ becomes the one to K, the two scalar multiplies become the layer's ``scale`` (their
product), and a mask that broadcasts along the query axis is tiled to [seq_q, seq_k] (every
ncnn SDPA implementation reads the mask row by row).

``innerproduct`` (fp32 .bin): pnnx writes each Linear on a [seq, hidden] blob as a ``Gemm``
with constant B (``transB``, [out, in]) and C (a [out] row, or none). ncnn's ``InnerProduct``
on a 2-D blob computes the same rows with the same [out, in] weights, and its x86 kernel is
faster on a BERT's shapes (benchmarks/bench_ncnn_ceiling.py: 0-13 % less CPU time at one
thread). The .param line changes and the .bin loses the 4-byte type flag before each bias (a
Gemm's C is a flagged blob, an InnerProduct's bias is raw); the .bin is walked layer by layer
with ``ncnn_int8.layout`` (a layer type of unknown layout: not applied, said).

Each rewrite runs in a child (ncnn can crash the process): the blob shapes it needs come from
ncnn itself (one run of the unchanged .param), and the rewritten .param replaces the original
only when, on several inputs (masks with padding), its outputs are as close to ONNX Runtime's
on the prepared ONNX as the original's are (``CHECK_ATOL``): else the step says why not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mtconvert.backends.process import child_main, run_job

# the rewritten .param's outputs may differ from ONNX Runtime's by the original's own
# difference plus this (summation order of the fused products; well inside the fp32 profile)
CHECK_ATOL = 2e-5
FLIP_3D = {0: 1, 1: 0, 2: 3, 3: 2, 4: 5, 5: 4}  # ncnn Permute order -> with w and h swapped


@dataclass
class Layer:
    kind: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: list[str] = field(default_factory=list)

    def line(self) -> str:
        return " ".join([f"{self.kind:<24}", f"{self.name:<24}", str(len(self.bottoms)),
                         str(len(self.tops)), *self.bottoms, *self.tops, *self.params])

    def param(self, key: str, default: str | None = None) -> str | None:
        return next((p.split("=", 1)[1] for p in self.params if p.split("=", 1)[0] == key),
                    default)


def read_param(path: Path) -> list[Layer]:
    lines = path.read_text().splitlines()
    if lines[0].strip() != "7767517":
        raise ValueError("no ncnn magic number")
    layers = []
    for ln in lines[2:2 + int(lines[1].split()[0])]:
        f = ln.split()
        nb, nt = int(f[2]), int(f[3])
        layers.append(Layer(f[0], f[1], f[4:4 + nb], f[4 + nb:4 + nb + nt], f[4 + nb + nt:]))
    return layers


def write_param(path: Path, layers: list[Layer]) -> None:
    blobs = {t for layer in layers for t in layer.tops}
    path.write_text("\n".join(["7767517", f"{len(layers)} {len(blobs)}",
                               *(layer.line() for layer in layers)]) + "\n")


class _Graph:
    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.producer = {t: layer for layer in layers for t in layer.tops}
        self.readers: dict[str, list[Layer]] = {}
        for layer in layers:
            for b in layer.bottoms:
                self.readers.setdefault(b, []).append(layer)

    def only_reader(self, blob: str) -> Layer | None:
        readers = self.readers.get(blob, [])
        return readers[0] if len(readers) == 1 else None


def _scalar_factor(layer: Layer) -> float | None:
    """s when ``layer`` is x*s or x/s with a scalar (ncnn BinaryOp with_scalar)."""
    if layer.kind != "BinaryOp" or layer.param("1") != "1" or len(layer.bottoms) != 1:
        return None
    op, b = layer.param("0", "0"), float(layer.param("2", "0"))
    if op == "2":
        return b
    return 1.0 / b if op == "3" and b != 0 else None


@dataclass
class Attention:
    """One matched attention: the layers it replaces and the SDPA's inputs."""
    query: str
    key_t: str            # the blob Kᵀ (before its scalar multiply)
    value: str
    mask: str | None
    out: str
    scale: float
    removed: list[Layer]
    anchor: Layer              # the A·V MatMul: the SDPA takes its place
    key_permute: Layer | None  # Permute making Kᵀ, read only by this attention


def match_attentions(layers: list[Layer]) -> list[Attention]:
    g = _Graph(layers)
    return [a for sm in layers if sm.kind == "Softmax" for a in [_match(g, sm)] if a]


def _from_matmul(g: _Graph, blob: str) -> bool:
    """``blob`` is a MatMul's output, maybe times scalars."""
    src = g.producer.get(blob)
    while src is not None and _scalar_factor(src) is not None:
        src = g.producer.get(src.bottoms[0])
    return src is not None and src.kind == "MatMul"


def _match(g: _Graph, softmax: Layer) -> Attention | None:
    if softmax.param("0", "0") not in ("2", "-1"):
        return None
    pre = g.producer.get(softmax.bottoms[0])
    removed, mask = [softmax], None
    if pre is not None and pre.kind == "BinaryOp" and len(pre.bottoms) == 2 \
            and pre.param("0", "0") == "0" and g.only_reader(pre.tops[0]) is softmax:
        scores = [b for b in pre.bottoms if _from_matmul(g, b)]
        if len(scores) != 1 or pre.bottoms.count(scores[0]) != 1:
            return None
        mask = next(b for b in pre.bottoms if b != scores[0])
        removed.append(pre)
        pre = g.producer[scores[0]]
    scale = 1.0
    while pre is not None and _scalar_factor(pre) is not None \
            and g.only_reader(pre.tops[0]) is removed[-1]:  # scores * s (eager attention)
        scale *= _scalar_factor(pre)
        removed.append(pre)
        pre = g.producer.get(pre.bottoms[0])
    if pre is None or pre.kind != "MatMul" or pre.param("0", "0") != "0" \
            or g.only_reader(pre.tops[0]) is not removed[-1]:
        return None
    qk, av = pre, g.only_reader(softmax.tops[0])
    if av is None or av.kind != "MatMul" or av.param("0", "0") != "0" \
            or av.bottoms[0] != softmax.tops[0] or av.bottoms[1] == softmax.tops[0]:
        return None
    removed += [qk, av]
    ends = []
    for blob in qk.bottoms:
        src = g.producer.get(blob)
        s = _scalar_factor(src) if src is not None else None
        if s is not None and g.only_reader(blob) is qk:
            scale *= s
            removed.append(src)
            blob = src.bottoms[0]
        ends.append(blob)
    if ends[0] == ends[1]:
        return None
    perm = g.producer.get(ends[1])
    if perm is None or perm.kind != "Permute" or len(g.readers.get(ends[1], [])) != 1 \
            or int(perm.param("0", "0")) not in FLIP_3D:
        perm = None
    return Attention(ends[0], ends[1], av.bottoms[1], mask, av.tops[0], scale, removed, av,
                     perm)


def _fmt(x: float) -> str:
    return f"{x:.9e}"


def fuse(layers: list[Layer], attentions: list[Attention],
         shapes: dict[str, tuple[int, ...]]) -> tuple[list[Layer], list[str]]:
    """``layers`` with each attention whose blob shapes fit made one SDPA layer; the reasons
    the others were left."""
    gone: set[int] = set()
    changed: dict[int, Layer] = {}
    extra: dict[int, list[Layer]] = {}   # id(av MatMul) -> layers put in its place
    notes = []
    for k, a in enumerate(attentions):
        plan = _plan(k, a, shapes)
        if isinstance(plan, str):
            notes.append(plan)
            continue
        new_layers, permute = plan
        if permute is not None:
            changed[id(a.key_permute)] = permute
        gone |= {id(x) for x in a.removed}
        extra[id(a.anchor)] = new_layers
    out = []
    for layer in layers:
        if id(layer) in extra:
            out += extra[id(layer)]
        elif id(layer) not in gone:
            out.append(changed.get(id(layer), layer))
    return out, notes


def _plan(k: int, a: Attention, shapes: dict[str, tuple[int, ...]]
          ) -> tuple[list[Layer], Layer | None] | str:
    """The layers replacing attention ``k`` (and its key Permute, changed), or why not."""
    q, kt, v = shapes.get(a.query), shapes.get(a.key_t), shapes.get(a.value)
    if not (q and kt and v) or len(q) != 3 or len(kt) != 3 or len(v) != 3:
        return f"attention {k}: Q/Kᵀ/V are not 3-D blobs"
    heads, seq_q, dim = q
    if a.scale == 0.0:  # SDPA reads scale 0 as "1/sqrt(dim)"
        return f"attention {k}: scale 0"
    if kt[1] != dim or v[1] != kt[2] or heads % kt[0] or kt[0] != v[0]:
        return f"attention {k}: shapes Q{q} Kᵀ{kt} V{v} do not fit SDPA"
    new: list[Layer] = []
    key = f"sdpa{k}_k"
    permute = None
    if a.key_permute is not None:
        order = FLIP_3D[int(a.key_permute.param("0", "0"))]
        permute = replace(a.key_permute, tops=[key], params=[f"0={order}"])
    else:
        new.append(Layer("Permute", f"sdpa{k}_kperm", [a.key_t], [key], ["0=1"]))
    bottoms = [a.query, key, a.value]
    if a.mask is not None:
        m = shapes.get(a.mask)
        if m is None or m[-1] != kt[2]:
            return f"attention {k}: mask shape {m} is not [.., {kt[2]}]"
        if len(m) == 3 and m[0] not in (1, heads) or len(m) > 3:
            return f"attention {k}: mask shape {m} does not broadcast over {heads} heads"
        mask = a.mask
        if len(m) == 1:
            new.append(Layer("Reshape", f"sdpa{k}_mask2d", [mask], [f"sdpa{k}_m2"],
                             [f"0={m[0]}", "1=1"]))
            mask, m = f"sdpa{k}_m2", (1, m[0])
        if m[-2] == 1 and seq_q > 1:
            axis = 0 if len(m) == 2 else 1
            new.append(Layer("Tile", f"sdpa{k}_masktile", [mask], [f"sdpa{k}_mask"],
                             [f"0={axis}", f"1={seq_q}"]))
            mask = f"sdpa{k}_mask"
        elif m[-2] != seq_q:
            return f"attention {k}: mask shape {m} is not [.., {seq_q}, {kt[2]}]"
        bottoms.append(mask)
    params = ([f"5={int(a.mask is not None)}", f"6={_fmt(a.scale)}"])
    new.append(Layer("SDPA", f"sdpa_{k}", bottoms, [a.out], params))
    return new, permute


# ---- the child: shapes from ncnn, the rewrite, the check against ONNX Runtime ----

def blob_shapes(param: Path, feeds: list[tuple[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Every blob's shape (numpy order: c, h, w; batch axis dropped) from one ncnn run."""
    import ncnn
    import numpy as np

    net = _net(param)
    ex = net.create_extractor()
    ex.set_light_mode(False)
    for blob, value in feeds:
        ex.input(blob, ncnn.Mat(value).clone())
    shapes = {}
    for layer in read_param(param):
        for t in layer.tops:
            ret, mat = ex.extract(t)
            if ret == 0:
                shapes[t] = tuple(np.array(mat.numpy()).shape)
    return shapes


def _net(param: Path) -> Any:
    import ncnn

    net = ncnn.Net()
    net.opt.num_threads = 1
    net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
    net.opt.use_fp16_packed = net.opt.use_bf16_storage = False
    if net.load_param(str(param)) != 0 or net.load_model(str(param.with_suffix(".bin"))) != 0:
        raise RuntimeError(f"ncnn could not load {param.name}")
    return net


def run_ncnn(param: Path, feeds: list[tuple[str, Any]], outs: list[str]) -> list[Any]:
    import ncnn
    import numpy as np

    ex = _net(param).create_extractor()
    for blob, value in feeds:
        ex.input(blob, ncnn.Mat(value).clone())
    results = []
    for blob in outs:
        ret, mat = ex.extract(blob)
        if ret != 0:
            raise RuntimeError(f"ncnn extract({blob}) returned {ret}")
        results.append(np.array(mat.numpy()).ravel())
    return results


def check_inputs(onnx_path: Path, shapes: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Feeds for the check: ids inside the embedding table they index, 0/1 masks with no, a
    quarter and half padding, normal floats elsewhere."""
    import numpy as np
    import onnx

    model = onnx.load(str(onnx_path))
    inits = {i.name: i.dims for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    sets = []
    for keep in (1.0, 0.75, 0.5):
        feeds = {}
        for i in model.graph.input:
            shape = shapes[i.name]
            elem = i.type.tensor_type.elem_type
            if "mask" in i.name.lower():
                m = (np.arange(shape[-1]) < max(1, int(shape[-1] * keep)))
                feeds[i.name] = np.broadcast_to(m, shape).astype(
                    np.float32 if elem == 1 else np.int64)
            elif elem in (6, 7):
                tables = [inits[n.input[0]][0] for n in model.graph.node
                          if n.op_type == "Gather" and n.input[1] == i.name
                          and n.input[0] in inits]
                feeds[i.name] = rng.integers(0, min(tables, default=2), shape).astype(
                    np.int64 if elem == 7 else np.int32)
            else:
                feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        sets.append(feeds)
    return sets


def worst_vs_ort(onnx_path: Path, params: list[Path], inputs: list[tuple[str, str, str]],
                 outputs: list[tuple[str, str]], shapes: dict[str, list[int]]) -> list[float]:
    """Per .param, its largest output difference from ONNX Runtime over the check inputs.
    ``inputs``: (blob, onnx name, dtype); ``outputs``: (blob, onnx name)."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = [0.0] * len(params)
    for feeds in check_inputs(onnx_path, shapes):
        ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
        nfeeds = [(blob, np.ascontiguousarray(feeds[name][0], dtype=np.int32
                                              if dtype.startswith("int") else np.float32))
                  for blob, name, dtype in inputs]
        for k, p in enumerate(params):
            got = run_ncnn(p, nfeeds, [b for b, _ in outputs])
            for value, (_, name) in zip(got, outputs, strict=True):
                want = np.asarray(ref[name], np.float64).ravel()
                if value.size != want.size:
                    worst[k] = math.inf
                    continue
                worst[k] = max(worst[k], float(np.abs(value - want).max()))
    return worst


def _feeds0(job: dict[str, Any]) -> list[tuple[str, Any]]:
    """The first check input set as ncnn blobs (for ``blob_shapes``)."""
    import numpy as np

    feeds0 = check_inputs(Path(job["onnx"]), job["shapes"])[0]
    return [(blob, np.ascontiguousarray(feeds0[name][0], dtype=np.int32
                                        if dtype.startswith("int") else np.float32))
            for blob, name, dtype in job["inputs"]]


def _keep_if_close(step: str, param: Path, layers: list[Layer], data: bytes | None,
                   job: dict[str, Any]) -> tuple[float, float] | str:
    """Write the candidate (``layers``; ``data``: its .bin, None for the original's) beside
    ``param`` and replace ``param`` (and .bin) with it when its outputs stay as close to ONNX
    Runtime's as the original's (``CHECK_ATOL``): (before, after), or why not."""
    candidate = param.with_name(f"{param.stem}.{step}.param")
    write_param(candidate, layers)
    binf = param.with_suffix(".bin")
    candidate.with_suffix(".bin").write_bytes(binf.read_bytes() if data is None else data)
    try:
        before, after = worst_vs_ort(Path(job["onnx"]), [param, candidate], job["inputs"],
                                     job["outputs"], job["shapes"])
        after += job.get("test_offset", 0.0)  # test seam: a forced mismatch
        if after > before + CHECK_ATOL:
            return (f"{step}: not applied: the rewritten .param differs from ONNX Runtime by "
                    f"{after:.3g}, the original by {before:.3g}")
        candidate.with_suffix(".bin").replace(binf)
        candidate.replace(param)
    finally:
        candidate.unlink(missing_ok=True)
        candidate.with_suffix(".bin").unlink(missing_ok=True)
    return before, after


def sdpa_child(job: dict[str, Any]) -> dict[str, Any]:
    """Rewrite job["param"] in place when the check passes; say what was done."""
    param = Path(job["param"])
    layers = read_param(param)
    attentions = match_attentions(layers)
    if not attentions:
        return {"applied": 0, "step": None}
    fused, notes = fuse(layers, attentions, blob_shapes(param, _feeds0(job)))
    n = len(attentions) - len(notes)
    left = f" ({len(notes)} left: {notes[0]})" if notes else ""
    if not n:
        return {"applied": 0, "step": f"sdpa: not applied{left}"}
    kept = _keep_if_close("sdpa", param, fused, None, job)
    if isinstance(kept, str):
        return {"applied": 0, "step": kept}
    before, after = kept
    return {"applied": n, "step": (
        f"sdpa: {n} attention(s) (Q·Kᵀ MatMul, scale, mask if any, Softmax, ·V MatMul) -> "
        f"ncnn SDPA{left}; "
        f"ncnn vs ONNX Runtime max abs {after:.2g} (unfused {before:.2g})")}


# ---- Gemm with constant weights on a 2-D blob -> InnerProduct ----

def dense_gemm(layer: Layer, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, bool] | None:
    """(N, K, has bias) when ``layer`` is a Gemm InnerProduct computes the same way: A the
    2-D [M, K] input blob, B constant [N, K] (transB), C none or a constant [N] row, alpha and
    beta 1, no output options, not int8."""
    if layer.kind != "Gemm" or len(layer.bottoms) != 1 or len(layer.tops) != 1:
        return None
    p = {k: layer.param(k, "0") for k in ("2", "3", "4", "5", "6", "7", "8", "9", "10", "11",
                                          "12", "13", "14", "18")}
    if (p["2"], p["3"], p["4"], p["5"]) != ("0", "1", "0", "1") or any(
            p[k] != "0" for k in ("11", "12", "13", "14", "18")):
        return None
    if float(layer.param("0", "1")) != 1.0 or float(layer.param("1", "1")) != 1.0:
        return None
    bias = p["6"] == "1" and p["10"] != "-1"
    if bias and p["10"] != "4":
        return None
    m, n, k = int(p["7"]), int(p["8"]), int(p["9"])
    shape = shapes.get(layer.bottoms[0])
    if n <= 0 or k <= 0 or shape is None or len(shape) != 2 or shape[1] != k \
            or (m and shape[0] != m):
        return None
    return n, k, bias


def gemm_to_innerproduct(layers: list[Layer], data: bytes, shapes: dict[str, tuple[int, ...]]
                         ) -> tuple[list[Layer], bytes, int] | str:
    """``layers`` and .bin ``data`` with each ``dense_gemm`` an InnerProduct (same weights:
    Gemm's transposed B is InnerProduct's [out, in]; the bias loses the 4-byte type flag Gemm's
    C has and InnerProduct's bias has not), and how many; or why the .bin cannot be rewritten."""
    from mtconvert.backends.ncnn_int8 import FLOAT_FLAG, layout

    walked = layout([(x.kind, x.name, x.bottoms, x.tops, x.params) for x in layers], len(data))
    if isinstance(walked, str):
        return walked
    out_layers, out, n_done = [], bytearray(), 0
    for layer, found in zip(layers, walked, strict=True):
        dense = dense_gemm(layer, shapes)
        c = next((b for b in found if b.role == "C"), None)
        if dense is None or any(b.flagged and data[b.offset:b.offset + 4] != FLOAT_FLAG
                                for b in found):
            out_layers.append(layer)
            out += b"".join(data[b.offset:b.offset + b.size] for b in found)
            continue
        n, k, bias = dense
        out_layers.append(Layer("InnerProduct", layer.name, layer.bottoms, layer.tops,
                                [f"0={n}", f"1={int(bias)}", f"2={n * k}"]))
        w = next(b for b in found if b.role == "weight")
        out += data[w.offset:w.offset + w.size]
        if bias and c is not None:
            out += data[c.offset + 4:c.offset + c.size]
        n_done += 1
    return out_layers, bytes(out), n_done


def innerproduct_child(job: dict[str, Any]) -> dict[str, Any]:
    """The ``innerproduct`` step: job["param"] (and .bin) rewritten when the check passes."""
    param = Path(job["param"])
    layers = read_param(param)
    if not any(x.kind == "Gemm" for x in layers):
        return {"applied": 0, "step": None}
    done = gemm_to_innerproduct(layers, param.with_suffix(".bin").read_bytes(),
                                blob_shapes(param, _feeds0(job)))
    if isinstance(done, str):
        return {"applied": 0, "step": f"innerproduct: not applied: {done}"}
    new_layers, data, n = done
    if not n:
        return {"applied": 0, "step": "innerproduct: not applied: no Gemm with constant "
                "weights on a 2-D blob"}
    kept = _keep_if_close("innerproduct", param, new_layers, data, job)
    if isinstance(kept, str):
        return {"applied": 0, "step": kept}
    before, after = kept
    left = sum(1 for x in new_layers if x.kind == "Gemm")
    return {"applied": n, "step": (
        f"innerproduct: {n} Gemm(s) with constant weights on a 2-D blob -> ncnn InnerProduct "
        f"(its x86 kernel is faster on [seq, hidden] blobs: benchmarks/bench_ncnn_ceiling.py)"
        + (f", {left} Gemm(s) left" if left else "")
        + f"; ncnn vs ONNX Runtime max abs {after:.2g} (before {before:.2g})")}


def fuse_attention(param: Path, onnx_path: Path, shapes: dict[str, list[int]],
                   inputs: list[list[str]], outputs: list[list[Any]], *, log: Path,
                   timeout: float | None, test_offset: float = 0.0) -> str | None:
    """The ``sdpa`` step on a built .param (in a child): its line for the artifact's steps, or
    None when the .param has no attention to fuse."""
    return _step("sdpa", param, onnx_path, shapes, inputs, outputs, log=log, timeout=timeout,
                 test_offset=test_offset)


def dense_to_innerproduct(param: Path, onnx_path: Path, shapes: dict[str, list[int]],
                          inputs: list[list[str]], outputs: list[list[Any]], *, log: Path,
                          timeout: float | None, test_offset: float = 0.0) -> str | None:
    """The ``innerproduct`` step on a built fp32 .param/.bin (in a child): its line for the
    artifact's steps, or None when the .param has no Gemm."""
    return _step("innerproduct", param, onnx_path, shapes, inputs, outputs, log=log,
                 timeout=timeout, test_offset=test_offset)


def _step(command: str, param: Path, onnx_path: Path, shapes: dict[str, list[int]],
          inputs: list[list[str]], outputs: list[list[Any]], *, log: Path,
          timeout: float | None, test_offset: float) -> str | None:
    job = {"command": command, "param": str(param), "onnx": str(onnx_path), "shapes": shapes,
           "inputs": [list(i[:3]) for i in inputs], "outputs": [list(o[:2]) for o in outputs],
           "test_offset": test_offset}
    try:
        result = run_job(__name__, job, param.with_suffix(f".{command}.job.json"),
                         target="ncnn", step=command, log_path=log, timeout_s=timeout)
    except Exception as exc:  # an optimisation: the .param stands as it was, the step says why
        return f"{command}: not applied: {str(exc).splitlines()[0][:200]}"
    return result["step"]


COMMANDS = {"sdpa": sdpa_child, "innerproduct": innerproduct_child}

if __name__ == "__main__":
    child_main(lambda job: COMMANDS[job["command"]](job))
