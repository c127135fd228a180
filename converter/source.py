"""Load and describe the source model: an ONNX file, a torch.export program (.pt2), or an
in-memory torch.nn.Module with example inputs. Produces a PreparedSource for the backends.

Every failure to read the model is a ModelLoadError (exit 2) with one line naming the problem.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert import deps, safety
from mtconvert.backends.base import PreparedSource, TensorSpec
from mtconvert.errors import ModelLoadError, UsageError, first_line

ONNX_SUFFIXES = (".onnx",)
TORCH_EXPORT_SUFFIXES = (".pt2",)
OPSET = 17


@dataclass
class LoadedSource:
    prepared: PreparedSource
    sha256: str | None
    int_highs: dict[str, int] = field(default_factory=dict)  # input -> embedding table size
    weight_dims: set[int] = field(default_factory=set)  # sizes of weight axes (hidden size...)
    example_feeds: dict[str, np.ndarray] | None = None  # torch sources' own example inputs
    sparsity: dict[str, Any] | None = None  # mtconvert.sparsity.of_onnx's, None: not pruned
    # a .pt2 exported with dynamic_shapes: {input: {axis: (symbol, min, max or None)}}
    dynamic_axes: dict[str, dict[int, tuple[str, int, int | None]]] = field(default_factory=dict)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(model: Any, work_dir: Path, example_inputs: Any = None, *, trust_pickle: bool = False,
         max_bytes: int | None = None, cache: Any = None) -> LoadedSource:
    """Dispatch on the kind of ``model``. Shapes are fixed later (see shapes.resolve_shapes).
    Pickle payloads are refused unless ``trust_pickle``; a trusted pickled module takes its
    example inputs from ``example_inputs`` (e.g. the user's --inputs). ``cache`` (a
    mtconvert.cache.SourceCache) keeps what loading a file computes: an ONNX model's
    description, a .pt2 program's ONNX export; a file seen before is not parsed or exported
    again."""
    if isinstance(model, (str, Path)):
        path = _check_path(Path(model), max_bytes)
        if path.suffix.lower() in safety.PICKLE_SUFFIXES or (
                path.suffix.lower() in ONNX_SUFFIXES and safety.looks_like_pickle(path)):
            if not trust_pickle:
                raise safety.refuse_pickle(path)
            return _from_pickle(path, work_dir, example_inputs)
        if path.suffix.lower() not in ONNX_SUFFIXES + TORCH_EXPORT_SUFFIXES:
            raise ModelLoadError(f"unsupported model file type {path.suffix or '(none)'!r}: "
                                 f"{path.name}; expected .onnx or .pt2 (torch.export)")
        if path.suffix.lower() in TORCH_EXPORT_SUFFIXES:
            payloads = [] if trust_pickle else safety.pt2_pickle_payloads(path)
            if payloads:
                raise ModelLoadError(f"{path.name} carries pickle payloads that loading would run "
                                     f"({'; '.join(payloads[:3])}); "
                                     f"{safety.pickle_advice(payloads)}")
            module, feeds, dynamic = _load_pt2(path)
            return _from_torch(module, feeds, work_dir, path.stem, path, cache, dynamic)
        return _from_onnx(path, work_dir, cache)
    if _is_torch_module(model):
        if example_inputs is None:
            raise UsageError("a torch.nn.Module source needs example_inputs (a tensor, a tuple "
                             "of tensors or a dict of name -> tensor)")
        return _from_torch(model, example_inputs, work_dir, type(model).__name__.lower(), None)
    raise UsageError(f"cannot use a {type(model).__name__} as a model: give a path to .onnx or "
                     ".pt2, or a torch.nn.Module with example_inputs")


def _check_path(path: Path, max_bytes: int | None) -> Path:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"model path is a directory, not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"model file is empty: {path}")
    if max_bytes is not None and size > max_bytes:
        raise ModelLoadError(f"{path.name} is {size} bytes, over --max-model-bytes {max_bytes}")
    return path.resolve()


def _from_pickle(path: Path, work_dir: Path, example_inputs: Any) -> LoadedSource:
    """A module the user trusts: TorchScript (torch.jit.load) or torch.save of an nn.Module."""
    if example_inputs is None:
        raise UsageError(f"{path.name}: a pickled module needs example inputs: --inputs FILE.npz")
    try:
        import torch
    except ImportError:
        raise ModelLoadError("reading a pickled module needs torch: pip install "
                             "'mtconvert[torch]'") from None
    try:
        module = torch.jit.load(str(path))
    except Exception:
        try:
            module = torch.load(str(path), weights_only=False)
        except Exception as exc:
            raise ModelLoadError(f"{path.name} is not a readable pickled module: "
                                 f"{first_line(exc)}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{path.name} holds a {type(module).__name__}, not a torch.nn.Module")
    feeds = {k: torch.from_numpy(np.asarray(v)) for k, v in example_inputs.items()}
    return _from_torch(module, feeds, work_dir, path.stem, path)


# --- ONNX -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Description:
    """What the pipeline reads of a source ONNX, as plain data a cache can keep."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    int_highs: dict[str, int]
    weight_dims: set[int]
    quantization: dict[str, Any]  # mtconvert.quantized.describe's, {} for a float graph
    sparsity: dict[str, Any] | None = None  # mtconvert.sparsity.of_onnx's (a pruned source)

    @classmethod
    def of(cls, model: Any) -> Description:
        from mtconvert import quantized, sparsity

        inputs, outputs = describe_onnx(model)
        return cls(inputs, outputs, embedding_table_sizes(model), weight_dims(model),
                   quantized.describe(model) or {}, sparsity.of_onnx(model))

    def to_meta(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs],
                "int_highs": self.int_highs, "weight_dims": sorted(self.weight_dims),
                "quantization": self.quantization, "sparsity": self.sparsity}

    @classmethod
    def from_meta(cls, d: dict[str, Any]) -> Description:
        return cls(tuple(TensorSpec.from_dict(x) for x in d["inputs"]),
                   tuple(TensorSpec.from_dict(x) for x in d["outputs"]),
                   {k: int(v) for k, v in d["int_highs"].items()}, set(d["weight_dims"]),
                   d.get("quantization"), d.get("sparsity"))


def _from_onnx(path: Path, work_dir: Path, cache: Any = None) -> LoadedSource:
    """A file described before (same bytes, same code) is not parsed again: the ONNX package
    is not even imported then."""
    sha = sha256_of(path)
    key = cache.key(sha, kind="onnx", onnx=deps.dist_version("onnx")) if cache else None
    hit = cache.get(key) if cache else None
    if hit is not None:
        desc = Description.from_meta(hit[0])
    else:
        model = read_onnx(path)
        desc = _with_bytes(Description.of(model), model, path)
        if cache and not _external_data(model):  # external files may change on their own
            cache.put(key, desc.to_meta())
    prepared = PreparedSource(format="onnx", name=path.stem, onnx_path=path, inputs=desc.inputs,
                              outputs=desc.outputs, input_shapes={}, work_dir=work_dir, path=path,
                              quantization=desc.quantization)
    return LoadedSource(prepared, sha, desc.int_highs, desc.weight_dims,
                        sparsity=desc.sparsity)


def _with_bytes(desc: Description, model: Any, path: Path) -> Description:
    """A quantized source's description holds its bytes on disk (what its artifacts are held
    to), measured from the parsed model so that a warm run needs no ONNX parse for it."""
    if not desc.quantization:
        return desc
    from dataclasses import replace

    from mtconvert import quantized

    return replace(desc, quantization=desc.quantization |
                   {"source_bytes": quantized.model_bytes(model, path)})


def _external_data(model: Any) -> bool:
    return any(t.data_location == 1 for t in model.graph.initializer)  # 1: EXTERNAL


def read_onnx(path: Path) -> Any:
    """Parse and check an ONNX file; any failure is a one-line ModelLoadError."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a readable ONNX model: {first_line(exc)}") from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path.name} is not an ONNX model (no graph found)")
    safety.check_external_data(model, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelLoadError(f"{path.name}: external data unreadable: {first_line(exc)}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a valid ONNX model: {first_line(exc)}") from None
    return model


def _value_spec(vi: Any) -> TensorSpec:
    from onnx import helper

    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise ModelLoadError(f"input/output {vi.name!r} is not a tensor; only tensors are supported")
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
    except Exception:
        dtype = f"onnx-type-{tt.elem_type}"
    return TensorSpec(vi.name, tuple(dims), dtype)


def describe_onnx(model: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = tuple(_value_spec(v) for v in model.graph.input if v.name not in inits)
    outputs = tuple(_value_spec(v) for v in model.graph.output)
    if not outputs:
        raise ModelLoadError("the ONNX graph has no outputs")
    return inputs, outputs


def weight_dims(model: Any) -> set[int]:
    """Every axis size (> 1) of the weights of rank >= 2, initializers and Constant nodes alike:
    hidden sizes, head sizes, embedding sizes, position tables..."""
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
        if a.name == "value"]
    return {int(d) for t in tensors if len(t.dims) >= 2 for d in t.dims if d > 1}


_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity"}


def embedding_table_sizes(model: Any) -> dict[str, int]:
    """For each graph input used as Gather indices into an initializer (possibly through
    casts/reshapes), the table's first dimension: the exclusive bound for valid ids."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    sizes = {}
    for vi in model.graph.input:
        size = _table_size(vi.name, consumers, inits, depth=0)
        if size:
            sizes[vi.name] = size
    return sizes


def _table_size(name: str, consumers: dict, inits: dict, depth: int) -> int | None:
    if depth > 4:
        return None
    sizes = []
    for node in consumers.get(name, []):
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            table = inits.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if table and axis == 0:
                sizes.append(int(table[0]))
        elif node.op_type in _PASS_THROUGH and node.input and node.input[0] == name:
            sub = _table_size(node.output[0], consumers, inits, depth + 1)
            if sub:
                sizes.append(sub)
    return min(sizes) if sizes else None


# --- PyTorch --------------------------------------------------------------------------------

def _is_torch_module(obj: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _load_pt2(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    try:
        import torch
    except ImportError:
        raise ModelLoadError("reading a .pt2 program needs torch: pip install 'mtconvert[torch]'") from None
    from mtconvert import torch_quantized

    torch_quantized.register_ops()  # a PT2E program's quantize/dequantize ops
    try:
        ep = torch.export.load(str(path))
    except ModuleNotFoundError as exc:
        raise ModelLoadError(f"{path.name} needs the {exc.name} package to be read (its "
                             f"tensors were pickled with {exc.name}'s classes): pip install "
                             f"{exc.name}") from None
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a readable torch.export program: "
                             f"{first_line(exc)}") from None
    example = getattr(ep, "example_inputs", None)
    if not example:
        raise ModelLoadError(f"{path.name} was saved without example inputs; re-export it with "
                             "torch.export.export(model, args) and torch.export.save")
    args, kwargs = example
    names = [s.arg.name for s in ep.graph_signature.input_specs
             if s.kind.name == "USER_INPUT"]
    feeds = dict(zip(names, args, strict=False)) | dict(kwargs or {})
    return ep.module(), feeds, _dynamic_axes(ep, names)


def _dynamic_axes(ep: Any, names: list[str]) -> dict[str, dict[int, tuple[str, int, int | None]]]:
    """The program's user inputs' symbolic axes (torch.export Dims): {input: {axis: (symbol,
    min, max)}}, max None when unbounded; axes sharing a Dim share the symbol. An axis whose
    size is an expression of symbols (``2*s0``) is not an input's own Dim and is left out."""
    import sympy

    ranges = {str(k): v for k, v in ep.range_constraints.items()}
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    out: dict[str, dict[int, tuple[str, int, int | None]]] = {}
    for name in names:
        for axis, size in enumerate(getattr(vals.get(name), "shape", ())):
            expr = getattr(getattr(size, "node", None), "expr", None)
            if not isinstance(expr, sympy.Symbol) or str(expr) not in ranges:
                continue
            bounds = ranges[str(expr)]
            upper = int(bounds.upper) if bounds.upper.is_finite else None
            out.setdefault(name, {})[axis] = (str(expr), int(bounds.lower), upper)
    return out


def _from_torch(module: Any, example_inputs: Any, work_dir: Path, name: str,
                path: Path | None, cache: Any = None,
                dynamic: dict[str, dict[int, tuple[str, int, int | None]]] | None = None
                ) -> LoadedSource:
    from mtconvert import torch_source

    feeds = torch_source.normalize_inputs(module, example_inputs)
    onnx_path = work_dir / f"{name}.onnx"
    sha = sha256_of(path) if path else None
    key = _export_key(cache, sha, feeds, dynamic)
    desc = _cached_export(cache, key, onnx_path)
    if desc is None:
        desc, external = _export(module, feeds, onnx_path, dynamic)
        if cache and key and not external:  # over 2 GB: the export has side files; not kept
            cache.put(key, desc.to_meta(), (onnx_path,))
    prepared = PreparedSource(format="torch", name=name, onnx_path=onnx_path,
                              inputs=desc.inputs, outputs=desc.outputs, input_shapes={},
                              work_dir=work_dir, path=path, torch_module=module,
                              quantization=desc.quantization)
    np_feeds = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
    return LoadedSource(prepared, sha, desc.int_highs, desc.weight_dims, np_feeds,
                        sparsity=desc.sparsity, dynamic_axes=dynamic or {})


def _export(module: Any, feeds: dict[str, Any], onnx_path: Path,
            dynamic: dict[str, dict[int, tuple[str, int, int | None]]] | None = None
            ) -> tuple[Description, bool]:
    """The module exported to ``onnx_path`` (a .pt2's Dims as named dynamic axes): its
    description, and whether the export has external data files."""
    from mtconvert import torch_quantized, torch_source

    exported, quantization = torch_quantized.exportable(module, feeds)
    axes = {k: {a: d[0] for a, d in v.items()} for k, v in (dynamic or {}).items()}
    with _without_pre_hooks(exported if axes else None):
        output_names = torch_source.export_onnx(exported, feeds, onnx_path, OPSET, axes or None)
    if quantization:
        torch_quantized.finish(onnx_path)
    model = read_onnx(onnx_path)
    desc = Description.of(model)
    if quantization and desc.quantization:
        from dataclasses import replace

        desc = replace(desc, quantization=desc.quantization | quantization)
    if [o.name for o in desc.outputs] != output_names:
        raise ModelLoadError(f"exported ONNX outputs {[o.name for o in desc.outputs]} do not "
                             f"match the module's outputs {output_names}")
    return desc, _external_data(model)


@contextlib.contextmanager
def _without_pre_hooks(module: Any) -> Any:
    """``module``'s forward pre-hooks lifted for the ONNX export. ``ep.module()`` of a program
    with Dims checks its inputs in a pre-hook when the call stack holds a file whose name has
    "executorch" in it (torch/export/_unlift.py ``_ok_to_generate_guards_fn``), and under the
    exporter's jit trace that check recursed in FakeTensor dispatch ("maximum recursion depth
    exceeded"). The export runs at the program's own example inputs, inside its ranges."""
    hooks = dict(module._forward_pre_hooks) if module is not None else {}
    if module is not None:
        module._forward_pre_hooks.clear()
    try:
        yield
    finally:
        if module is not None:
            module._forward_pre_hooks.update(hooks)


def _export_key(cache: Any, sha: str | None, feeds: dict[str, Any],
                dynamic: dict[str, Any] | None = None) -> str | None:
    """A .pt2 file's export is keyed by its bytes, the example inputs it carries (their
    shapes and dtypes), the exporter's versions and the opset."""
    if cache is None or sha is None:
        return None
    return cache.key(sha, kind="torch-export", opset=OPSET, torch=deps.dist_version("torch"),
                     onnx=deps.dist_version("onnx"),
                     inputs={k: [list(v.shape), str(v.dtype)] for k, v in feeds.items()},
                     **({"dynamic_axes": {k: {str(a): list(d) for a, d in v.items()}
                                          for k, v in dynamic.items()}} if dynamic else {}))


def _cached_export(cache: Any, key: str | None, onnx_path: Path) -> Description | None:
    """The stored export copied to ``onnx_path``, and its description; None on a miss."""
    import shutil

    hit = cache.get(key) if cache and key else None
    stored = next(hit[1].glob("*.onnx"), None) if hit else None
    if hit is None or stored is None:
        return None
    shutil.copyfile(stored, onnx_path)
    return Description.from_meta(hit[0])
