"""Load and describe the source model: an ONNX file, a torch.export program (.pt2), or an
in-memory torch.nn.Module with example inputs. Produces a PreparedSource for the backends.

Every failure to read the model is a ModelLoadError (exit 2) with one line naming the problem.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert import safety
from mtconvert.backends.base import PreparedSource, TensorSpec
from mtconvert.errors import ModelLoadError, UsageError

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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(model: Any, work_dir: Path, example_inputs: Any = None, *, trust_pickle: bool = False,
         max_bytes: int | None = None) -> LoadedSource:
    """Dispatch on the kind of ``model``. Shapes are fixed later (see shapes.resolve_shapes).
    Pickle payloads are refused unless ``trust_pickle``; a trusted pickled module takes its
    example inputs from ``example_inputs`` (e.g. the user's --inputs)."""
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
                                     f"({'; '.join(payloads[:3])}); {safety.TRUST_HINT}")
            return _from_torch(*_load_pt2(path), work_dir, path.stem, path)
        return _from_onnx(path, work_dir)
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
                                 f"{_first_line(exc)}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{path.name} holds a {type(module).__name__}, not a torch.nn.Module")
    feeds = {k: torch.from_numpy(np.asarray(v)) for k, v in example_inputs.items()}
    return _from_torch(module, feeds, work_dir, path.stem, path)


# --- ONNX -----------------------------------------------------------------------------------

def _from_onnx(path: Path, work_dir: Path) -> LoadedSource:
    model = read_onnx(path)
    inputs, outputs = describe_onnx(model)
    prepared = PreparedSource(format="onnx", name=path.stem, onnx_path=path, inputs=inputs,
                              outputs=outputs, input_shapes={}, work_dir=work_dir, path=path)
    return LoadedSource(prepared, sha256_of(path), embedding_table_sizes(model), weight_dims(model))


def read_onnx(path: Path) -> Any:
    """Parse and check an ONNX file; any failure is a one-line ModelLoadError."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a readable ONNX model: {_first_line(exc)}") from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path.name} is not an ONNX model (no graph found)")
    safety.check_external_data(model, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelLoadError(f"{path.name}: external data unreadable: {_first_line(exc)}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a valid ONNX model: {_first_line(exc)}") from None
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


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


def _load_pt2(path: Path) -> tuple[Any, Any]:
    try:
        import torch
    except ImportError:
        raise ModelLoadError("reading a .pt2 program needs torch: pip install 'mtconvert[torch]'") from None
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a readable torch.export program: "
                             f"{_first_line(exc)}") from None
    example = getattr(ep, "example_inputs", None)
    if not example:
        raise ModelLoadError(f"{path.name} was saved without example inputs; re-export it with "
                             "torch.export.export(model, args) and torch.export.save")
    args, kwargs = example
    names = [s.arg.name for s in ep.graph_signature.input_specs
             if s.kind.name == "USER_INPUT"]
    feeds = dict(zip(names, args, strict=False)) | dict(kwargs or {})
    return ep.module(), feeds


def _from_torch(module: Any, example_inputs: Any, work_dir: Path, name: str,
                path: Path | None) -> LoadedSource:
    from mtconvert import torch_source

    feeds = torch_source.normalize_inputs(module, example_inputs)
    onnx_path = work_dir / f"{name}.onnx"
    output_names = torch_source.export_onnx(module, feeds, onnx_path, OPSET)
    model = read_onnx(onnx_path)
    inputs, outputs = describe_onnx(model)
    if [o.name for o in outputs] != output_names:
        raise ModelLoadError(f"exported ONNX outputs {[o.name for o in outputs]} do not match "
                             f"the module's outputs {output_names}")
    prepared = PreparedSource(format="torch", name=name, onnx_path=onnx_path, inputs=inputs,
                              outputs=outputs, input_shapes={}, work_dir=work_dir, path=path,
                              torch_module=module)
    np_feeds = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
    return LoadedSource(prepared, sha256_of(path) if path else None,
                        embedding_table_sizes(model), weight_dims(model), np_feeds)
