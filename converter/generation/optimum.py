"""An ONNX set exported as Hugging Face Optimum does, as a generation source: a folder with
config.json and Optimum's graphs (``model.onnx``, or ``decoder_model.onnx`` /
``decoder_with_past_model.onnx`` / ``decoder_model_merged.onnx``), no weights file.

Decoder-only sets. The reference is ONNX Runtime running the user's own graphs greedily with
their growing (dynamic) cache: the prompt in one pass (``decoder_model.onnx`` if the set has
it, else the with-past graph with an empty past), then a token at a time — the user's artifact
is the yardstick. The targets get the with-past graph made static by graph surgery, in the
decode-step layout of mtconvert.generation.step (so loop.py and judge.py run unchanged): the
past fixed at ``max_cache`` slots (``past_key_{i}``/``past_value_{i}``), the float
``attention_mask`` [1, max_cache + 1] (Optimum's covers past + current, the current token last:
empty slots are masked by it) cast to the graph's integer mask, every ``present.{i}.*`` sliced
to the last position (``present_key_{i}``/``present_value_{i}``). A merged graph's
``use_cache_branch`` If is folded to its with-past branch. The static graph is checked against
the source graphs in ONNX Runtime before any target sees it.

Encoder-decoder sets (``encoder_model.onnx``) are mtconvert.generation.optimum_seq2seq's."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.errors import ModelLoadError, UsageError
from mtconvert.generation import folder as folder_mod
from mtconvert.generation.reference import Reference
from mtconvert.generation.step import Geometry

MODEL, DECODER, WITH_PAST, MERGED, ENCODER = ("model.onnx", "decoder_model.onnx",
                                              "decoder_with_past_model.onnx",
                                              "decoder_model_merged.onnx", "encoder_model.onnx")
GRAPHS = (MODEL, DECODER, WITH_PAST, MERGED, ENCODER)
PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
PRESENT = re.compile(r"present\.(\d+)\.(key|value)$")
FLAG = "use_cache_branch"


@dataclass
class OptimumSet:
    folder: folder_mod.HFFolder  # config, task, label, tokenizer; ``weights``: the graphs
    with_past: Path  # the graph the targets get (static): with-past, merged or model.onnx
    prefill: Path  # the graph the reference runs the prompt through

    @property
    def merged(self) -> bool:
        return self.with_past.name == MERGED


def is_optimum_set(model: Any) -> bool:
    """A folder with config.json and one of Optimum's graphs, and no weights file (a folder
    with weights is a model folder, whatever else it holds)."""
    if not folder_mod.is_hf_folder(model):
        return False
    p = Path(model)
    weights = folder_mod.SAFE_WEIGHTS + folder_mod.PICKLED_WEIGHTS
    return ((p / "config.json").is_file() and any((p / g).is_file() for g in GRAPHS)
            and not any((p / w).is_file() for w in weights))


def open_set(path: Path, task: str | None) -> OptimumSet:
    """The set's config and the graphs it will use; every problem one line, exit 2."""
    path = Path(path).resolve()
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not readable JSON: {exc}") from None
    present = [g for g in GRAPHS if (path / g).is_file()]
    archs = config.get("architectures") or []
    task = task or folder_mod._task_of(archs) or "text-generation"
    if ENCODER in present or config.get("is_encoder_decoder"):  # convert mode sends these
        # sets to mtconvert.generation.optimum_seq2seq; a caller of Generation gets this
        raise UsageError(f"{path.name}: an encoder-decoder Optimum set is converted by "
                         "mtconvert.generation.optimum_seq2seq, not as a decoder-only step")
    if task in folder_mod.SEQ2SEQ_TASKS:
        raise UsageError(f"--task {task}: {path.name} is a decoder-only Optimum set (no "
                         f"{ENCODER}, config.json not encoder-decoder); it generates text "
                         "(--task text-generation)")
    if task != "text-generation":
        raise UsageError(f"--task {task}: an Optimum ONNX set is supported for "
                         "text-generation only")
    with_past = next((path / g for g in (WITH_PAST, MERGED, MODEL) if g in present), None)
    if with_past is None or not _takes_past(with_past):
        raise UsageError(f"{path.name}: no decoder-with-past graph (decoder_with_past_model.onnx,"
                         " decoder_model_merged.onnx, or a model.onnx with past_key_values "
                         "inputs: export with --task text-generation-with-past); found "
                         f"{', '.join(present)}")
    prefill = path / DECODER if DECODER in present else with_past
    files = tuple(path / g for g in present)
    folder = folder_mod.HFFolder(path, config, task, files,
                                 folder_mod._digest([path / "config.json", *files]))
    return OptimumSet(folder, with_past, prefill)


def _takes_past(path: Path) -> bool:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's input
        raise ModelLoadError(f"{path.name} is not a readable ONNX model: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else exc}") from None
    return any(PAST.match(i.name) for i in graph.input)


# --- the graphs' layout -----------------------------------------------------------------------
def layout(model: Any, name: str, vocab: int) -> tuple[int, int, int, int]:
    """(layers, kv heads, head dim, vocab) of a with-past graph; unknown I/O names, or no
    position_ids, refused."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    ins = [i for i in graph.input if i.name not in inits]
    known = {"input_ids", "attention_mask", "position_ids", FLAG}
    odd = [i.name for i in ins if i.name not in known and not PAST.match(i.name)]
    odd += [o.name for o in graph.output if o.name != "logits" and not PRESENT.match(o.name)]
    names = {i.name for i in ins}
    if odd or not {"input_ids", "attention_mask"} <= names:
        missing = sorted({"input_ids", "attention_mask"} - names)
        raise UsageError(f"{name}: not Optimum's decoder I/O layout (unknown: "
                         f"{', '.join(odd[:6]) or '-'}; missing: {', '.join(missing) or '-'}); "
                         "expected input_ids, attention_mask, position_ids, "
                         "past_key_values.{i}.key/value -> logits, present.{i}.key/value")
    if "position_ids" not in names:
        raise UsageError(f"{name}: no position_ids input; the static step graph needs explicit "
                         "positions (Optimum writes position_ids for GPT-2 and Llama-style "
                         "text-generation)")
    past = {PAST.match(i.name).groups(): i for i in ins if PAST.match(i.name)}
    layers = len({k[0] for k in past})
    want = {(str(i), kv) for i in range(layers) for kv in ("key", "value")}
    if set(past) != want or {PRESENT.match(o.name).groups() for o in graph.output
                             if o.name != "logits"} != want:
        raise UsageError(f"{name}: past_key_values.* inputs and present.* outputs do not pair "
                         f"up for {layers} layers")
    dims = [d.dim_value for d in past[("0", "key")].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[1] or not dims[3]:
        raise UsageError(f"{name}: past_key_values.0.key should be [batch, kv_heads, past, "
                         "head_dim] with fixed heads and head size")
    logits = next(o for o in graph.output if o.name == "logits")
    vdims = [d.dim_value for d in logits.type.tensor_type.shape.dim]
    vocab = vdims[-1] if vdims and vdims[-1] else vocab
    if not vocab:
        raise UsageError(f"{name}: the vocabulary size is neither fixed in logits' shape nor "
                         "given by config.json's vocab_size")
    return layers, dims[1], dims[3], vocab


def fold_merged(model: Any) -> Any:
    """A merged graph's ``use_cache_branch`` If replaced by its with-past (then) branch."""
    from onnx import helper

    graph = model.graph
    ifs = [n for n in graph.node if n.op_type == "If" and list(n.input) == [FLAG]]
    if len(ifs) != 1:
        raise UsageError("decoder_model_merged.onnx: no If on use_cache_branch to fold")
    node = ifs[0]
    branch = next(a.g for a in node.attribute if a.name == "then_branch")
    renames = dict(zip((o.name for o in branch.output), node.output, strict=True))
    nodes = []
    for n in graph.node:
        if n is node:
            for inner in branch.node:
                inner.output[:] = [renames.get(o, o) for o in inner.output]
                inner.input[:] = [renames.get(i, i) for i in inner.input]
                nodes.append(inner)
        else:
            nodes.append(n)
    inputs = [i for i in graph.input if i.name != FLAG]
    out = helper.make_graph(nodes, graph.name, inputs, graph.output,
                            [*graph.initializer, *branch.initializer])
    return helper.make_model(out, opset_imports=model.opset_import, ir_version=model.ir_version)


def static_step(s: OptimumSet, max_cache: int, out: Path) -> Geometry:
    """The with-past graph as the decode step (module docstring), saved to ``out``."""
    import onnx
    from onnx import TensorProto, helper

    from mtconvert.source import read_onnx

    model = read_onnx(s.with_past)
    if s.merged:
        model = fold_merged(model)
    vocab = int(s.folder.config.get("vocab_size") or 0)
    layers, kv, hd, vocab = layout(model, s.with_past.name, vocab)
    geo = Geometry(layers, kv, hd, vocab, max_cache)
    g = model.graph
    mask_type = next(i for i in g.input if i.name == "attention_mask").type.tensor_type.elem_type
    ren = {f"past_key_values.{i}.{kv_}": f"past_{kv_}_{i}" for i in range(layers)
           for kv_ in ("key", "value")}
    ren["attention_mask"] = "attention_mask__source"
    for n in _all_nodes(g):
        n.input[:] = [ren.get(x, x) for x in n.input]
    shapes = {"input_ids": [1, 1], "position_ids": [1, 1], **{v: list(geo.cache_shape())
                                                           for k, v in ren.items()
                                                           if k.startswith("past_")}}
    ins = [helper.make_tensor_value_info(name, TensorProto.INT64 if "_ids" in name
                                         else TensorProto.FLOAT, shapes[name])
           for name in ("input_ids", "position_ids")]
    ins.append(helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT,
                                             [1, max_cache + 1]))
    ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n])
            for n in geo.input_names()[3:]]
    pre = [helper.make_node("Cast", ["attention_mask"], ["attention_mask__source"],
                            to=mask_type, name="step::mask_cast")]
    last = helper.make_tensor("step::last", TensorProto.INT64, [1], [max_cache])
    end = helper.make_tensor("step::end", TensorProto.INT64, [1], [max_cache + 1])
    axis = helper.make_tensor("step::axis", TensorProto.INT64, [1], [2])
    post, outs = [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, vocab])]
    for i in range(layers):
        for kv_ in ("key", "value"):
            name = f"present_{kv_}_{i}"
            post.append(helper.make_node("Slice", [f"present.{i}.{kv_}", "step::last",
                                                   "step::end", "step::axis"], [name],
                                         name=f"step::{name}"))
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, kv, 1, hd]))
    graph = helper.make_graph([*pre, *_cache_concats(g.node, set(geo.input_names()[3:])), *post],
                              "decode_step", ins, outs,
                              [*g.initializer, last, end, axis])
    step = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    step.producer_name = "mtconvert (Optimum set, static step)"
    onnx.checker.check_model(step)
    onnx.save(step, str(out))
    return geo


def _cache_concats(nodes: Any, inputs: set[str]) -> list[Any]:
    """Each cache update, Concat(past input, this step's K/V) on the position axis, written
    as the same Concat between two Transposes (positions last, then back): exact, and a graph
    input is then never concatenated as it is with a computed tensor (onnx2tf gives the two
    different layouts and fails; mtconvert.generation.step avoids the same trap)."""
    from onnx import helper

    out = []
    for n in nodes:
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        if n.op_type != "Concat" or n.input[0] not in inputs or axis not in (2, -2):
            out.append(n)
            continue
        swapped = [f"{x}__t{n.name}" for x in n.input]
        out += [helper.make_node("Transpose", [x], [t], perm=[0, 1, 3, 2], name=f"{t}::swap")
                for x, t in zip(n.input, swapped, strict=True)]
        out.append(helper.make_node("Concat", swapped, [f"{n.output[0]}__t"], axis=3,
                                    name=n.name))
        out.append(helper.make_node("Transpose", [f"{n.output[0]}__t"], [n.output[0]],
                                    perm=[0, 1, 3, 2], name=f"{n.name}::back"))
    return out


def _all_nodes(graph: Any) -> list[Any]:
    """Every node, subgraphs included (a renamed input may be read inside an If or Loop)."""
    out = []
    for n in graph.node:
        out.append(n)
        for a in n.attribute:
            if a.g is not None and a.g.node:
                out += _all_nodes(a.g)
            for sub in a.graphs:
                out += _all_nodes(sub)
    return out


# --- the reference ----------------------------------------------------------------------------
class _Graph:
    """An ONNX Runtime session on one of the set's graphs, fed by name."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - the user's graph
            raise ModelLoadError(f"{path.name}: ONNX Runtime cannot open it: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.name = path.name

    def run(self, ids: list[int], start: int, past: dict[str, np.ndarray] | None,
            geo: Geometry, cache_flag: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """logits [len(ids), vocab] and the present K/V, the tokens at positions start...."""
        n = len(ids)
        int_type = {"tensor(int32)": np.int32}.get(self.inputs["attention_mask"].type, np.int64)
        feeds = {"input_ids": np.array([ids], np.int64),
                 "attention_mask": np.ones((1, start + n), int_type),
                 "position_ids": np.arange(start, start + n, dtype=np.int64)[None]}
        for i in range(geo.layers):
            for kv in ("key", "value"):
                name = f"past_key_values.{i}.{kv}"
                if name in self.inputs:
                    feeds[name] = past[f"present.{i}.{kv}"] if past else np.zeros(
                        (1, geo.kv_heads, 0, geo.head_dim), np.float32)
        if FLAG in self.inputs:
            feeds[FLAG] = np.array([cache_flag])
        feeds = {k: v for k, v in feeds.items() if k in self.inputs}
        try:
            got = dict(zip(self.outputs, self.sess.run(None, feeds), strict=True))
        except Exception as exc:  # noqa: BLE001 - the user's graph failing on its own inputs
            raise ModelLoadError(f"{self.name}: ONNX Runtime failed to run it: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
        return np.asarray(got["logits"], np.float32)[0], {k: v for k, v in got.items()
                                                          if k != "logits"}


def greedy(s: OptimumSet, geo: Geometry, prompt: tuple[int, ...], new_tokens: int,
           threads: int = 1) -> Reference:
    """The set's own graphs in ONNX Runtime, greedy, growing cache (module docstring)."""
    import onnxruntime as ort

    step = _Graph(s.with_past, threads)
    first = step if s.prefill == s.with_past else _Graph(s.prefill, threads)
    logits, past = first.run(list(prompt), 0, None, geo, cache_flag=False)
    rows, seq = [logits], list(prompt)
    for _ in range(new_tokens - 1):
        seq.append(int(np.argmax(rows[-1][-1])))
        logits, past = step.run([seq[-1]], len(seq) - 1, past, geo, cache_flag=True)
        rows.append(logits)
    seq.append(int(np.argmax(rows[-1][-1])))
    return Reference(tuple(prompt), tuple(seq[len(prompt):]), np.concatenate(rows),
                     "onnxruntime (the set's own graphs, dynamic cache)", ort.__version__)


def forced_logits(path: Path, geo: Geometry, ref: Reference, threads: int = 1) -> np.ndarray:
    """The static step graph's logits (ONNX Runtime, teacher forced along the reference, the
    host loop's padded cache): what the surgery is checked by."""
    from mtconvert.generation.loop import decode

    sess = _Graph(path, threads).sess
    names = [o.name for o in sess.get_outputs()]
    return decode(lambda f: dict(zip(names, sess.run(None, f), strict=True)), geo, ref.prompt,
                  len(ref.tokens), forced=ref.tokens).logits


def example_feeds(path: Path, geo: Geometry, prompt: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The step graph's example inputs: the last prompt token with the prompt's real cache."""
    from mtconvert.generation.loop import decode

    sess = _Graph(path, 1).sess
    seen: list[dict[str, np.ndarray]] = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(feeds)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, feeds), strict=True))

    decode(run, geo, prompt, 1)
    return {k: v.copy() for k, v in seen[-1].items()}


# --- the run's source -------------------------------------------------------------------------
def step_source(sk: Any, s: OptimumSet, prompt: tuple[int, ...], how: str, max_cache: int,
                work: Path) -> tuple[Any, Reference, Geometry]:
    """(the static step graph loaded by the run skeleton ``sk`` as its source, the reference,
    the geometry). The step graph is refused when it does not reproduce the set's own decode
    within the fp32 tolerance (then the surgery does not fit this graph: nothing is
    converted)."""
    from dataclasses import replace

    from mtconvert.validators import gates
    from mtconvert.validators.tolerances import PROFILES

    opts = sk.opts
    sk.say(f"loading {s.folder.label} (Optimum ONNX set: {s.with_past.name})")
    path = work / f"{_stem(s.folder.label)}-step.onnx"
    geo = static_step(s, max_cache, path)
    sk.clock.lap("load_source_s")
    sk.say(f"reference: greedy decode of {opts.max_new_tokens} tokens, the set's graphs in "
           "ONNX Runtime")
    ref = greedy(s, geo, prompt, opts.max_new_tokens, opts.threads)
    forced = forced_logits(path, geo, ref, opts.threads)
    err = float(np.max(np.abs(forced - ref.logits)))
    verdict = gates.judge({"logits": ref.logits}, {"logits": forced}, lambda _n: PROFILES["fp32"])
    if not verdict.passed:
        raise ModelLoadError(f"{s.folder.label}: the static step graph made from "
                             f"{s.with_past.name} does not reproduce its decode (max abs "
                             f"{err:.3g}): this graph's layout is not supported")
    sk.settings["generation"] = {
        "task": s.folder.task, "prompt": how, "max_new_tokens": opts.max_new_tokens,
        "max_cache": max_cache, "reference": f"{ref.runtime} {ref.version}",
        "source_graphs": [f.name for f in s.folder.weights],
        "step_graph": f"{s.with_past.name}"
                      f"{' (If folded to its with-past branch)' if s.merged else ''}, "
                      f"past fixed at {max_cache} slots",
        "step_graph_max_abs_error": err}
    src = sk.load(path, work)
    sk.loaded = replace(sk.loaded, example_feeds=example_feeds(path, geo, prompt))
    src.name = f"{_stem(s.folder.label)}-step"
    return src, ref, geo


def _stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"
