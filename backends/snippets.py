"""Deployment snippets: the smallest code that loads an artifact and runs it on its platform,
filled with the artifact's real file name and its tensors' names, dtypes and shapes.

Each backend's ``snippets`` hook describes its artifact's inputs and outputs as ``Port``s (the
names, dtypes and input order its runtime uses) and calls these templates; the framework stores
the text in the report (``TargetReport.snippets``: language -> code) and renderers show it.
Templates are plain strings (no tool is imported here) and fill inputs with zeros: the caller's
data goes where the comments say.
"""
from __future__ import annotations

import json
import keyword
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mtconvert.backends.base import TensorSpec

# languages, in the order renderers show them
LANGUAGES = ("kotlin", "swift", "cpp", "python")


@dataclass(frozen=True)
class Port:
    """One input or output as the artifact's runtime addresses it."""

    name: str  # the runtime's name (ORT input, Core ML feature, ncnn blob, TFLite tensor)
    source: str  # the source model's name for it
    shape: tuple[int | str | None, ...]  # str/None: a dynamic axis
    dtype: str  # numpy dtype name, as the runtime takes or gives it
    index: int = 0  # position among the runtime's inputs or outputs
    note: str = ""  # a remark for the comment (a layout to undo, ...)

    @property
    def size(self) -> int | None:
        """Elements, when every axis is known."""
        if not all(isinstance(d, int) for d in self.shape):
            return None
        return math.prod(self.shape)  # type: ignore[arg-type]

    def describe(self) -> str:
        """``input_ids: int64 [1, 32]`` (and the source's name when the runtime's differs)."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        alias = f" (source {self.source})" if self.source != self.name else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.name}{alias}: {self.dtype} [{dims}]{note}"


def ports(specs: Sequence[TensorSpec]) -> list[Port]:
    """Ports named as the source names them (a runtime that keeps the source's names)."""
    return [Port(s.name, s.name, tuple(s.shape), s.dtype, i) for i, s in enumerate(specs)]


# --- names and literals -----------------------------------------------------------------------

_KOTLIN_SWIFT_WORDS = {"as", "break", "class", "continue", "do", "else", "false", "for", "fun",
                       "if", "in", "interface", "is", "null", "object", "package", "return",
                       "super", "this", "throw", "true", "try", "typealias", "typeof", "val",
                       "var", "when", "while", "let", "func", "struct", "enum", "protocol",
                       "model", "inputs", "out", "config", "url", "env", "session", "interpreter",
                       "net", "ex", "feeds", "result", "outputs", "context", "results",
                       "features", "ret", "mat", "i", "fd"}


def identifiers(names: Sequence[str], camel: bool) -> list[str]:
    """Distinct variable names for tensor names (``input_ids`` -> ``inputIds`` in camel case);
    never a keyword nor a name the templates use themselves."""
    seen: set[str] = set()
    out = []
    for name in names:
        words = [w for w in re.split(r"[^0-9A-Za-z]+", name) if w] or ["tensor"]
        if camel:
            ident = words[0][:1].lower() + words[0][1:] + "".join(
                w[:1].upper() + w[1:] for w in words[1:])
        else:
            ident = "_".join(words).lower()
        if ident[0].isdigit():
            ident = "t" + ident
        if keyword.iskeyword(ident) or ident in _KOTLIN_SWIFT_WORDS or ident in {"np", "ort",
                                                                                 "ct", "ncnn"}:
            ident += "Value" if camel else "_value"
        base, n = ident, 2
        while ident in seen:
            ident, n = f"{base}{n}", n + 1
        seen.add(ident)
        out.append(ident)
    return out


def _q(text: str) -> str:
    """A double-quoted string literal (valid Python, Kotlin, Swift and C++)."""
    return json.dumps(text).replace("$", "\\$")


def _qpy(text: str) -> str:
    return json.dumps(text)


def _dims(shape: Sequence[int | str | None], sep: str = ", ") -> str:
    return sep.join(str(d) if isinstance(d, int) else "1" for d in shape)


def _stem(file_name: str) -> str:
    return file_name.split(".")[0]


def _fun_name(file_name: str) -> str:
    return "run" + "".join(w[:1].upper() + w[1:]
                           for w in re.split(r"[^0-9A-Za-z]+", _stem(file_name)) if w)


def _np_shape(shape: Sequence[int | str | None]) -> str:
    dims = [str(d) if isinstance(d, int) else "1" for d in shape]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _python_inputs(inputs: Sequence[Port], indent: str = "    ") -> list[str]:
    return [f"{indent}{_qpy(p.name)}: np.zeros({_np_shape(p.shape)}, dtype=np.{p.dtype}),"
            f"  # {p.describe()}" for p in inputs]


# --- ONNX Runtime (Mobile) --------------------------------------------------------------------

_ORT_KOTLIN = {  # dtype -> (Kotlin array, java.nio buffer, OnnxTensor getter, OnnxJavaType)
    "float32": ("FloatArray", "FloatBuffer", "floatBuffer", None),
    "float64": ("DoubleArray", "DoubleBuffer", "doubleBuffer", None),
    "int64": ("LongArray", "LongBuffer", "longBuffer", None),
    "int32": ("IntArray", "IntBuffer", "intBuffer", None),
    "int16": ("ShortArray", "ShortBuffer", "shortBuffer", None),
    "float16": ("ShortArray", "ShortBuffer", "shortBuffer", "FLOAT16"),
    "int8": ("ByteArray", "ByteBuffer", "byteBuffer", "INT8"),
    "uint8": ("ByteArray", "ByteBuffer", "byteBuffer", "UINT8"),
    "bool": ("ByteArray", "ByteBuffer", "byteBuffer", "BOOL"),
}


def python_onnxruntime(file_name: str, inputs: Sequence[Port], outputs: Sequence[Port]) -> str:
    names = identifiers([p.name for p in outputs], camel=False)
    lines = ["import numpy as np",
             "import onnxruntime as ort",
             "",
             f"session = ort.InferenceSession({_qpy(file_name)}, "
             "providers=[\"CPUExecutionProvider\"])",
             "feeds = {  # fill with your data",
             *_python_inputs(inputs),
             "}",
             f"{', '.join(names)}{',' if len(names) == 1 else ''} = session.run("
             f"[{', '.join(_qpy(p.name) for p in outputs)}], feeds)"]
    lines += [f"# {p.describe()}" for p in outputs]
    return "\n".join(lines) + "\n"


def kotlin_onnxruntime(file_name: str, inputs: Sequence[Port], outputs: Sequence[Port]) -> str:
    """ONNX Runtime's Android package (com.microsoft.onnxruntime:onnxruntime-android)."""
    ins = identifiers([p.name for p in inputs], camel=True)
    outs = identifiers([p.name for p in outputs], camel=True)
    buffers = sorted({_ORT_KOTLIN.get(p.dtype, _ORT_KOTLIN["float32"])[1] for p in inputs})
    lines = [f"// {file_name} in src/main/assets; "
             "dependency com.microsoft.onnxruntime:onnxruntime-android",
             *(["import ai.onnxruntime.OnnxJavaType"] if any(
                 _ORT_KOTLIN.get(p.dtype, _ORT_KOTLIN["float32"])[3] for p in inputs) else []),
             "import ai.onnxruntime.OnnxTensor",
             "import ai.onnxruntime.OrtEnvironment",
             "import ai.onnxruntime.OrtSession",
             "import android.content.Context",
             *[f"import java.nio.{b}" for b in buffers],
             *(["import java.nio.ByteOrder"] if "ByteBuffer" in buffers else []),
             "",
             f"fun {_fun_name(file_name)}(context: Context): Map<String, Any> {{",
             "    val env = OrtEnvironment.getEnvironment()",
             f"    val session = env.createSession(context.assets.open({_q(file_name)})"
             ".readBytes(), OrtSession.SessionOptions())"]
    lines.append("    // the shapes mtconvert validated; dynamic axes also take other sizes")
    for p, v in zip(inputs, ins, strict=True):
        array, buffer, _, jtype = _ORT_KOTLIN.get(p.dtype, _ORT_KOTLIN["float32"])
        n = p.size or 1
        lines.append(f"    // {p.describe()}: fill with your data")
        if buffer == "ByteBuffer":
            lines.append(f"    val {v} = OnnxTensor.createTensor(env, ByteBuffer.allocateDirect"
                         f"({n}).order(ByteOrder.nativeOrder()), longArrayOf({_dims(p.shape)}), "
                         f"OnnxJavaType.{jtype})")
        elif jtype:
            lines.append(f"    val {v} = OnnxTensor.createTensor(env, {buffer}.wrap({array}({n})), "
                         f"longArrayOf({_dims(p.shape)}), OnnxJavaType.{jtype})")
        else:
            lines.append(f"    val {v} = OnnxTensor.createTensor(env, {buffer}.wrap({array}({n})), "
                         f"longArrayOf({_dims(p.shape)}))")
    feeds = ", ".join(f"{_q(p.name)} to {v}" for p, v in zip(inputs, ins, strict=True))
    lines.append(f"    session.run(mapOf({feeds})).use {{ result ->")
    for p, v in zip(outputs, outs, strict=True):
        getter = _ORT_KOTLIN.get(p.dtype, _ORT_KOTLIN["float32"])[2]
        lines.append(f"        val {v} = (result.get({_q(p.name)}).get() as OnnxTensor)"
                     f".{getter}  // {p.describe()}")
    lines.append(f"        return mapOf({', '.join(f'{_q(p.name)} to {v}' for p, v in zip(outputs, outs, strict=True))})")
    lines += ["    }", "}"]
    return "\n".join(lines) + "\n"


# --- TFLite / LiteRT --------------------------------------------------------------------------

_TFLITE_KOTLIN = {  # dtype -> (bytes, ByteBuffer view, Kotlin array)
    "float32": (4, "asFloatBuffer", "FloatArray"), "float64": (8, "asDoubleBuffer", "DoubleArray"),
    "int64": (8, "asLongBuffer", "LongArray"), "int32": (4, "asIntBuffer", "IntArray"),
    "int16": (2, "asShortBuffer", "ShortArray"), "float16": (2, "asShortBuffer", "ShortArray"),
    "int8": (1, "", "ByteArray"), "uint8": (1, "", "ByteArray"), "bool": (1, "", "ByteArray"),
}


def python_tflite(file_name: str, inputs: Sequence[Port], outputs: Sequence[Port]) -> str:
    """``Port.index``: the tensor's position in the interpreter's input/output details."""
    names = identifiers([p.source for p in outputs], camel=False)
    lines = ["import numpy as np",
             "from ai_edge_litert.interpreter import Interpreter",
             "",
             f"interpreter = Interpreter(model_path={_qpy(file_name)}, num_threads=4)",
             "interpreter.allocate_tensors()",
             "inputs = interpreter.get_input_details()",
             "outputs = interpreter.get_output_details()"]
    for p in inputs:
        lines.append(f"interpreter.set_tensor(inputs[{p.index}][\"index\"], np.zeros("
                     f"{_np_shape(p.shape)}, dtype=np.{p.dtype}))  # {p.describe()}: your data")
    lines.append("interpreter.invoke()")
    for p, v in zip(outputs, names, strict=True):
        perm = _perm(p.note)
        tail = f".transpose({perm})" if perm else ""
        lines.append(f"{v} = interpreter.get_tensor(outputs[{p.index}][\"index\"]){tail}"
                     f"  # {p.describe()}")
    return "\n".join(lines) + "\n"


def _perm(note: str) -> str | None:
    m = re.search(r"transpose by \[([0-9, ]+)\]", note)
    return f"({m.group(1)})" if m else None


def kotlin_tflite(file_name: str, inputs: Sequence[Port], outputs: Sequence[Port]) -> str:
    """LiteRT's Interpreter (com.google.ai.edge.litert:litert, package org.tensorflow.lite)."""
    ins = identifiers([p.source for p in inputs], camel=True)
    outs = identifiers([p.source for p in outputs], camel=True)
    lines = [f"// {file_name} in src/main/assets, stored uncompressed "
             "(android { androidResources { noCompress += \"tflite\" } });",
             "// dependency com.google.ai.edge.litert:litert",
             "import android.content.Context",
             "import org.tensorflow.lite.Interpreter",
             "import java.io.FileInputStream",
             "import java.nio.ByteBuffer",
             "import java.nio.ByteOrder",
             "import java.nio.channels.FileChannel",
             "",
             f"fun {_fun_name(file_name)}(context: Context): Map<String, Any> {{",
             f"    val model = context.assets.openFd({_q(file_name)}).use {{ fd ->",
             "        FileInputStream(fd.fileDescriptor).channel.map(",
             "            FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)",
             "    }",
             "    val interpreter = Interpreter(model, Interpreter.Options().setNumThreads(4))"]
    for p, v in sorted(zip(inputs, ins, strict=True), key=lambda pv: pv[0].index):
        width, view, array = _TFLITE_KOTLIN.get(p.dtype, _TFLITE_KOTLIN["float32"])
        n = p.size or 1
        lines.append(f"    // input {p.index}: {p.describe()}")
        lines.append(f"    val {v} = ByteBuffer.allocateDirect({n * width})"
                     ".order(ByteOrder.nativeOrder())")
        fill = f"{v}.{view}().put({array}({n}))" if view else f"{v}.put({array}({n})).rewind()"
        lines.append(f"    {fill}  // your data")
    buffers = {}
    for p, v in zip(outputs, outs, strict=True):
        buffers[p.index] = f"{v}Buffer"
        lines.append(f"    val {v}Buffer = ByteBuffer.allocateDirect(interpreter.getOutputTensor"
                     f"({p.index}).numBytes()).order(ByteOrder.nativeOrder())")
    ordered = [v for _, v in sorted(zip(inputs, ins, strict=True), key=lambda pv: pv[0].index)]
    lines.append(f"    interpreter.runForMultipleInputsOutputs(arrayOf<Any>({', '.join(ordered)}),"
                 f" mapOf<Int, Any>({', '.join(f'{i} to {b}' for i, b in buffers.items())}))")
    for p, v in zip(outputs, outs, strict=True):
        width, view, array = _TFLITE_KOTLIN.get(p.dtype, _TFLITE_KOTLIN["float32"])
        lines.append(f"    {v}Buffer.rewind()")
        count = f"interpreter.getOutputTensor({p.index}).numElements()"
        get = f"{v}Buffer.{view}().get(it)" if view else f"{v}Buffer.get(it)"
        lines.append(f"    val {v} = {array}({count}).also {{ {get} }}  // {p.describe()}")
    lines.append("    interpreter.close()")
    lines.append(f"    return mapOf({', '.join(f'{_q(p.source)} to {v}' for p, v in zip(outputs, outs, strict=True))})")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- ncnn -------------------------------------------------------------------------------------

def _ncnn_dims(shape: Sequence[int | str | None]) -> list[int]:
    """ncnn's Mat dimensions (w, h, d, c order) of a one-item tensor: the batch axis dropped."""
    dims = [d if isinstance(d, int) else 1 for d in shape[1:]] or [1]
    return list(reversed(dims))


_NCNN_EXACT_PY = ["net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False",
                  "net.opt.use_fp16_packed = net.opt.use_bf16_storage = False"]


def python_ncnn(param: str, bin_name: str, inputs: Sequence[Port], outputs: Sequence[Port],
                exact: bool) -> str:
    names = identifiers([p.source for p in outputs], camel=False)
    lines = ["import ncnn",
             "import numpy as np",
             "",
             "net = ncnn.Net()",
             *(["# exact fp32, as validated (ncnn's defaults use fp16 where the CPU has it)",
                *_NCNN_EXACT_PY] if exact else
               ["# fp16 storage and arithmetic (ncnn's defaults), as validated"]),
             f"net.load_param({_qpy(param)})",
             f"net.load_model({_qpy(bin_name)})",
             "ex = net.create_extractor()",
             "# one item: ncnn models take no batch axis"]
    for p in inputs:
        lines.append(f"ex.input({_qpy(p.name)}, ncnn.Mat(np.zeros({_np_shape(p.shape)}, "
                     f"dtype=np.{p.dtype}), batch_index=0).clone())  # {p.describe()}: your data")
    for p, v in zip(outputs, names, strict=True):
        shape = _np_shape(p.shape) if p.size else None
        reshape = f".reshape({shape})" if shape else ""
        lines.append(f"ret, mat = ex.extract({_qpy(p.name)})")
        lines.append(f"{v} = np.array(mat.numpy()){reshape}  # {p.describe()}")
    return "\n".join(lines) + "\n"


def cpp_ncnn(param: str, bin_name: str, inputs: Sequence[Port], outputs: Sequence[Port],
             exact: bool) -> str:
    ins = identifiers([p.source for p in inputs], camel=True)
    outs = identifiers([p.source for p in outputs], camel=True)
    lines = ["// link ncnn (https://github.com/Tencent/ncnn); "
             f"ship {param} and {bin_name}",
             "#include <vector>",
             "#include \"net.h\"",
             "",
             f"int {_fun_name(param)}(std::vector<std::vector<float>>& results) {{",
             "    ncnn::Net net;"]
    if exact:
        lines += ["    // exact fp32, as validated (ncnn's defaults use fp16 where the CPU has it)",
                  "    net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = false;",
                  "    net.opt.use_fp16_packed = net.opt.use_bf16_storage = false;"]
    else:
        lines.append("    // fp16 storage and arithmetic (ncnn's defaults), as validated")
    lines += [f"    if (net.load_param({_q(param)}) != 0 || net.load_model({_q(bin_name)}) != 0)",
              "        return -1;",
              "    ncnn::Extractor ex = net.create_extractor();",
              "    // one item: ncnn models take no batch axis; Mat dimensions are w, h, (d,) c"]
    for p, v in zip(inputs, ins, strict=True):
        dims = _ncnn_dims(p.shape)
        n = math.prod(dims)
        ctype = "int" if p.dtype.startswith("int") else "float"
        lines.append(f"    // {p.describe()}")
        lines.append(f"    ncnn::Mat {v}({n});")
        lines.append(f"    {ctype}* {v}Data = ({ctype}*){v}.data;")
        lines.append(f"    for (int i = 0; i < {n}; i++) {v}Data[i] = 0;  // your data")
        if len(dims) > 1:
            lines.append(f"    {v} = {v}.reshape({', '.join(map(str, dims))});")
        lines.append(f"    ex.input({_q(p.name)}, {v});")
    for p, v in zip(outputs, outs, strict=True):
        lines.append(f"    ncnn::Mat {v};  // {p.describe()}")
        lines.append(f"    if (ex.extract({_q(p.name)}, {v}) != 0) return -1;")
        lines.append(f"    ncnn::Mat {v}Flat = {v}.reshape({v}.w * {v}.h * {v}.d * {v}.c);"
                     "  // without channel padding")
        lines.append(f"    results.emplace_back((const float*){v}Flat.data, "
                     f"(const float*){v}Flat.data + {v}Flat.w);")
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


# --- Core ML ----------------------------------------------------------------------------------

_SWIFT_TYPES = {"float32": ".float32", "float16": ".float16", "float64": ".double",
                "int32": ".int32"}


def python_coreml(file_name: str, inputs: Sequence[Port], outputs: Sequence[Port],
                  states: Sequence[str] = ()) -> str:
    """``states``: the model's state names (a stateful model, iOS18+: one state object per
    sequence, passed to every prediction of it)."""
    names = identifiers([p.source for p in outputs], camel=False)
    lines = ["import coremltools as ct  # predict() runs on macOS",
             "import numpy as np",
             "",
             f"model = ct.models.MLModel({_qpy(file_name)})"]
    if states:
        lines.append(f"state = model.make_state()  # holds {', '.join(states)}: one per "
                     "sequence, kept across its predictions")
    lines += ["out = model.predict({  # fill with your data",
              *_python_inputs(inputs),
              "}" + (", state=state)" if states else ")")]
    lines += [f"{v} = out[{_qpy(p.name)}]  # {p.describe()}"
              for p, v in zip(outputs, names, strict=True)]
    return "\n".join(lines) + "\n"


def swift_coreml(file_name: str, inputs: Sequence[Port], outputs: Sequence[Port],
                 minimum: str = "", states: Sequence[str] = ()) -> str:
    """``states``: the model's state names (a stateful model, iOS18+): the function then takes
    the loaded model and the sequence's MLState (``model.makeState()``, one per sequence, used
    with that model for each of its predictions)."""
    resource = file_name.removesuffix(".mlpackage")
    ins = identifiers([p.source for p in inputs], camel=True)
    outs = identifiers([p.source for p in outputs], camel=True)
    load = [f"let url = Bundle.main.url(forResource: {_q(resource)}, "
            "withExtension: \"mlmodelc\")!",
            "let config = MLModelConfiguration()",
            "config.computeUnits = .all",
            "let model = try MLModel(contentsOf: url, configuration: config)"]
    lines = [f"// add {file_name} to the Xcode target: Xcode compiles it to {resource}.mlmodelc"
             + (f" (minimum deployment target {minimum})" if minimum else ""),
             "import CoreML",
             ""]
    if states:
        lines += ["// once:", *[f"//   {x}" for x in load],
                  f"// per sequence (the cache {', '.join(states)} lives in it):",
                  "//   let state = model.makeState()",
                  f"func {_fun_name(file_name)}(model: MLModel, state: MLState) throws "
                  "-> [String: MLMultiArray] {"]
    else:
        lines += [f"func {_fun_name(file_name)}() throws -> [String: MLMultiArray] {{",
                  *[f"    {x}" for x in load]]
    for p, v in zip(inputs, ins, strict=True):
        lines.append(f"    // {p.describe()}")
        lines.append(f"    let {v} = try MLMultiArray(shape: [{_dims(p.shape)}], "
                     f"dataType: {_SWIFT_TYPES.get(p.dtype, '.float32')})")
        lines.append(f"    for i in 0..<{v}.count {{ {v}[i] = 0 }}  // your data")
    lines.append("    let features = try MLDictionaryFeatureProvider(dictionary: [")
    lines += [f"        {_q(p.name)}: MLFeatureValue(multiArray: {v}),"
              for p, v in zip(inputs, ins, strict=True)]
    lines += ["    ])", "    let out = try model.prediction(from: features"
              + (", using: state)" if states else ")")]
    for p, v in zip(outputs, outs, strict=True):
        lines.append(f"    let {v} = out.featureValue(for: {_q(p.name)})!.multiArrayValue!"
                     f"  // {p.describe()}")
    lines.append(f"    return [{', '.join(f'{_q(p.source)}: {v}' for p, v in zip(outputs, outs, strict=True))}]")
    lines.append("}")
    return "\n".join(lines) + "\n"
