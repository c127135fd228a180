"""Deployment snippets for a ``.pte``: Kotlin (ExecuTorch's Android ``Module`` API) and Python
(``executorch.runtime``). A .pte addresses inputs and outputs by position, so the snippets pass
them in the program's order; names in the comments are the source's. Helpers are the shared
templates' (mtconvert.backends.snippets)."""
from __future__ import annotations

from collections.abc import Sequence

from mtconvert.backends.snippets import Port, _fun_name, _q, _qpy, identifiers

# dtype -> (Kotlin array, Tensor.fromBlob factory, getter on a Tensor)
_KOTLIN = {
    "float32": ("FloatArray", "fromBlob", "dataAsFloatArray"),
    "float64": ("DoubleArray", "fromBlob", "dataAsDoubleArray"),
    "int64": ("LongArray", "fromBlob", "dataAsLongArray"),
    "int32": ("IntArray", "fromBlob", "dataAsIntArray"),
    "int8": ("ByteArray", "fromBlob", "dataAsByteArray"),
    "uint8": ("ByteArray", "fromBlobUnsigned", "dataAsUnsignedByteArray"),
}


def _dims(shape: Sequence[int | str | None]) -> str:
    return ", ".join(f"{d if isinstance(d, int) else 1}L" for d in shape)


def kotlin(file_name: str, inputs: Sequence[Port], outputs: Sequence[Port]) -> str:
    """ExecuTorch's Android library (org.pytorch:executorch-android): Module.load + forward."""
    ins = identifiers([p.source for p in inputs], camel=True)
    outs = identifiers([p.source for p in outputs], camel=True)
    lines = [f"// {file_name} in src/main/assets (Module.load takes a file path: copied to "
             "filesDir once)",
             "// dependency org.pytorch:executorch-android",
             "import android.content.Context",
             "import org.pytorch.executorch.EValue",
             "import org.pytorch.executorch.Module",
             "import org.pytorch.executorch.Tensor",
             "import java.io.File",
             "",
             f"fun {_fun_name(file_name)}(context: Context): Map<String, Any> {{",
             f"    val file = File(context.filesDir, {_q(file_name)})",
             "    if (!file.exists()) {",
             f"        context.assets.open({_q(file_name)}).use {{ a -> "
             "file.outputStream().use { a.copyTo(it) } }",
             "    }",
             "    val module = Module.load(file.absolutePath)"]
    for p, v in zip(inputs, ins, strict=True):
        array, factory, _ = _KOTLIN.get(p.dtype, _KOTLIN["float32"])
        lines.append(f"    // input {p.index}: {p.describe()}")
        lines.append(f"    val {v} = Tensor.{factory}({array}({p.size or 1}), "
                     f"longArrayOf({_dims(p.shape)}))  // your data")
    lines.append(f"    val outputs = module.forward("
                 f"{', '.join(f'EValue.from({v})' for v in ins)})")
    for p, v in zip(outputs, outs, strict=True):
        _, _, getter = _KOTLIN.get(p.dtype, _KOTLIN["float32"])
        lines.append(f"    val {v} = outputs[{p.index}].toTensor().{getter}  // {p.describe()}")
    lines.append("    module.destroy()")
    pairs = ", ".join(f"{_q(p.source)} to {v}" for p, v in zip(outputs, outs, strict=True))
    lines.append(f"    return mapOf({pairs})")
    lines.append("}")
    return "\n".join(lines) + "\n"


def python(file_name: str, inputs: Sequence[Port], outputs: Sequence[Port]) -> str:
    names = identifiers([p.source for p in outputs], camel=False)
    lines = ["import torch",
             "from executorch.runtime import Runtime",
             "",
             f"method = Runtime.get().load_program({_qpy(file_name)}).load_method(\"forward\")",
             "inputs = [  # fill with your data, in this order"]
    for p in inputs:
        dims = ", ".join(str(d if isinstance(d, int) else 1) for d in p.shape)
        dims = f"({dims},)" if len(p.shape) == 1 else f"({dims})"
        lines.append(f"    torch.zeros({dims}, dtype=torch.{p.dtype}),  # input {p.index}: "
                     f"{p.describe()}")
    lines.append("]")
    lines.append(f"{', '.join(names)}{',' if len(names) == 1 else ''} = method.execute(inputs)")
    lines += [f"# {p.describe()}" for p in outputs]
    return "\n".join(lines) + "\n"
