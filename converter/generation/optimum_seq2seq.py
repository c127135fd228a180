"""An encoder-decoder ONNX set exported as Hugging Face Optimum does (T5, BART, Marian;
Whisper): a folder with config.json, ``encoder_model.onnx`` (input_ids, attention_mask, or
Whisper's log-mel input_features → last_hidden_state),
``decoder_model.onnx`` (input_ids, encoder_attention_mask, encoder_hidden_states → logits,
present.{i}.decoder.key/value, present.{i}.encoder.key/value) and
``decoder_with_past_model.onnx`` (input_ids, encoder_attention_mask,
past_key_values.{i}.decoder/encoder.key/value → logits, present.{i}.decoder.key/value;
Whisper's decoders take no encoder_attention_mask) — or,
instead of those two, ``decoder_model_merged.onnx`` (both as the branches of an If on
``use_cache_branch``; the with-past branch's present.{i}.encoder.* are empty constants); no
weights file. Names from optimum-onnx's exporter (optimum/exporters/onnx/base.py,
OnnxSeq2SeqConfigWithPast; optimum/onnx/graph_transformations.py, merge_decoders).

The reference is ONNX Runtime running the set's own graphs (three, or two with a merged
decoder) greedily with their growing cache (mtconvert.generation.loop.decode_growing): the
user's artifact is the yardstick. Each graph then goes through the run skeleton as it is
(dynamic shapes) — its own one-step numerics against ONNX Runtime on the real feeds of the
reference's decode — on every target whose artifacts keep dynamic shapes
(``Backend.fixed_shapes`` false: onnx-mobile), and each target's artifacts generate through the
same growing-cache loop in a child, judged like any generation (teacher-forced logits,
free-running greedy tokens).

Fixed-shape targets are skipped, with the reason: Optimum's decoder-with-past graph has no
decoder self-attention mask and derives its positions from the past's length (BART's learned
positions, T5's relative bias, the causal mask), so padding its cache to a fixed length changes
what it computes; mtconvert's own fixed-cache graphs are built from the model folder
(config.json + model.safetensors) instead, for every target."""
from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.errors import ModelLoadError, MtConvertError, UsageError
from mtconvert.generation import encdec, folder as folder_mod, optimum, reference
from mtconvert.generation.loop import decode_growing
from mtconvert.generation.run import (_artifact_file, converted, graph_context,
                                      refuse_unsupported)
from mtconvert.generation.step import Geometry
from mtconvert.generation.target import EncoderInput, generated
from mtconvert.report import Report, TargetReport
from mtconvert.run.skeleton import Run

ROLES = {"with_past": optimum.WITH_PAST, "decoder": optimum.DECODER,
         "encoder": optimum.ENCODER}  # the first is the run's own skeleton (its report)
PAST = re.compile(r"past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")
PRESENT = re.compile(r"present\.(\d+)\.(decoder|encoder)\.(key|value)$")
IO = {"encoder": ({"input_ids", "attention_mask", "input_features"}, {"last_hidden_state"}),
      "decoder": ({"input_ids", "encoder_attention_mask", "encoder_hidden_states"}, {"logits"}),
      "with_past": ({"input_ids", "encoder_attention_mask", "encoder_hidden_states"},
                    {"logits"})}


@dataclass
class Seq2SeqSet:
    folder: folder_mod.HFFolder  # config, task, label; ``weights``: the graphs
    graphs: dict[str, Path]  # role (ROLES) -> file; a merged set: with_past and encoder
    geometry: Geometry  # decoder layers, heads, head dim, vocab (max_cache: set per run)

    @property
    def merged(self) -> bool:
        return "decoder" not in self.graphs


def is_seq2seq_set(model: Any) -> bool:
    """An Optimum set (optimum.is_optimum_set) of an encoder-decoder model: an encoder graph,
    or a config that says so."""
    if not optimum.is_optimum_set(model):
        return False
    p = Path(model)
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False  # optimum.open_set says why
    task = folder_mod._task_of(config.get("architectures") or [])
    return ((p / optimum.ENCODER).is_file() or bool(config.get("is_encoder_decoder"))
            or task in folder_mod.SEQ2SEQ_TASKS)


def open_set(path: Path, task: str | None) -> Seq2SeqSet:
    """The set's config and graphs, their I/O names checked; every problem one line, exit 2."""
    path = Path(path).resolve()
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not readable JSON: {exc}") from None
    present = [g for g in optimum.GRAPHS if (path / g).is_file()]
    roles = dict(ROLES)
    if optimum.MERGED in present and not {optimum.DECODER, optimum.WITH_PAST} <= set(present):
        roles = {"with_past": optimum.MERGED, "encoder": optimum.ENCODER}
    missing = [f for f in roles.values() if f not in present]
    if missing:
        raise UsageError(f"{path.name}: an encoder-decoder Optimum set needs "
                         f"{', '.join(ROLES.values())} (or {optimum.MERGED} for the two "
                         f"decoders); missing {', '.join(missing)}")
    graphs = {role: path / f for role, f in roles.items()}
    present = [g for g in present if g in roles.values()]
    layers, heads, head_dim, vocab, enc_inputs = _check_io(graphs,
                                                           int(config.get("vocab_size") or 0))
    task = task or folder_mod._task_of(config.get("architectures") or []) \
        or "text2text-generation"
    if task not in folder_mod.SEQ2SEQ_TASKS:
        raise UsageError(f"--task {task}: an encoder-decoder Optimum ONNX set is supported for "
                         f"{' and '.join(folder_mod.SEQ2SEQ_TASKS)} (T5, BART, Marian; "
                         "Whisper)")
    want = "input_features" if task == "automatic-speech-recognition" else "input_ids"
    if want not in enc_inputs:
        raise UsageError(f"--task {task}: {graphs['encoder'].name} takes "
                         f"{', '.join(sorted(enc_inputs))}, not {want}")
    files = tuple(path / g for g in present)
    folder = folder_mod.HFFolder(path, config, task, files,
                                 folder_mod._digest([path / "config.json", *files]))
    return Seq2SeqSet(folder, graphs, Geometry(layers, heads, head_dim, vocab, 0))


def _check_io(graphs: dict[str, Path], vocab: int) -> tuple[int, int, int, int, set[str]]:
    """(decoder layers, heads, head dim, vocab, the encoder's input names) from the graphs'
    I/O; any name Optimum does not write, a missing one, or unpaired pasts and presents
    refused."""
    import onnx

    io = {}
    for role, path in graphs.items():
        try:
            g = onnx.load(str(path), load_external_data=False).graph
        except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's input
            raise ModelLoadError(f"{path.name} is not a readable ONNX model: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else exc}") \
                from None
        inits = {i.name for i in g.initializer}
        io[role] = ({i.name: i for i in g.input if i.name not in inits},
                    {o.name: o for o in g.output})
        ins, outs = IO[role]
        odd = [n for n in io[role][0] if n not in ins and not (
            role == "with_past" and (PAST.match(n) or n == optimum.FLAG))]
        odd += [n for n in io[role][1] if n not in outs and not (role != "encoder"
                                                                and PRESENT.match(n))]
        need = {"encoder": {"last_hidden_state"}, "decoder": {"input_ids", "logits",
                                                              "encoder_hidden_states"},
                "with_past": {"input_ids", "logits"}}[role] - set(io[role][0]) - set(io[role][1])
        if role == "encoder" and not {"input_ids", "input_features"} & set(io[role][0]):
            need.add("input_ids")
        if odd or need:
            raise UsageError(f"{path.name}: not Optimum's {role.replace('_', '-')} I/O layout "
                             f"(unknown: {', '.join(sorted(odd)[:6]) or '-'}; missing: "
                             f"{', '.join(sorted(need)) or '-'})")
    past = {PAST.match(n).groups(): v for n, v in io["with_past"][0].items() if PAST.match(n)}
    layers = len({k[0] for k in past})
    want = {(str(i), p, kv) for i in range(layers) for p in ("decoder", "encoder")
            for kv in ("key", "value")}
    first = {PRESENT.match(n).groups() for n in io.get("decoder", io["with_past"])[1]
             if PRESENT.match(n)}
    step = {PRESENT.match(n).groups() for n in io["with_past"][1] if PRESENT.match(n)}
    if not layers or set(past) != want or first != want or not {
            k for k in want if k[1] == "decoder"} <= step:
        raise UsageError(f"{graphs['with_past'].name}: past_key_values.{{i}}.decoder/encoder.* "
                         f"inputs do not pair up with {graphs['decoder'].name}'s and its own "
                         "present.* outputs")
    dims = [d.dim_value for d in past[("0", "decoder", "key")].type.tensor_type.shape.dim]
    logits = [d.dim_value for d in io["with_past"][1]["logits"].type.tensor_type.shape.dim]
    vocab = logits[-1] if logits and logits[-1] else vocab
    if len(dims) != 4 or not dims[1] or not dims[3] or not vocab:
        raise UsageError(f"{graphs['with_past'].name}: past_key_values.0.decoder.key should be "
                         "[batch, heads, past, head_dim] with fixed heads and head size, and "
                         "the vocabulary fixed in logits' shape or config.json's vocab_size")
    return layers, dims[1], dims[3], vocab, set(io["encoder"][0])


# --- the reference ----------------------------------------------------------------------------
def greedy(s: Seq2SeqSet, encoder_feeds: dict[str, np.ndarray], start: int, new_tokens: int,
           threads: int = 1) -> tuple[reference.Reference, dict[str, dict[str, np.ndarray]]]:
    """The set's own graphs in ONNX Runtime, greedy, growing cache; and each graph's feeds at
    its last run in that decode (the graphs' example inputs; a merged graph's: its with-past
    branch's)."""
    import onnxruntime as ort

    sessions = {role: optimum._Graph(path, threads) for role, path in s.graphs.items()}
    seen: dict[str, dict[str, np.ndarray]] = {}

    def runner(role: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        g = sessions[role]

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            seen[role] = {k: np.array(v) for k, v in feeds.items()}
            try:
                return dict(zip(g.outputs, g.sess.run(None, feeds), strict=True))
            except Exception as exc:  # noqa: BLE001 - the user's graph on its own inputs
                raise ModelLoadError(f"{g.name}: ONNX Runtime failed to run it: "
                                     f"{str(exc).splitlines()[0][:200]}") from None
        return run

    sessions.setdefault("decoder", sessions["with_past"])  # a merged graph: both passes
    takes = {role: {i.name: tuple(i.shape) for i in g.sess.get_inputs()}
             for role, g in sessions.items()}
    feeds = {k: v for k, v in encoder_feeds.items() if k in takes["encoder"]}
    got, _ = decode_growing({role: runner(role) for role in sessions}, takes, feeds, (start,),
                            new_tokens)
    ref = reference.Reference((start,), tuple(got.tokens), got.logits,
                              "onnxruntime (the set's own graphs, growing cache)",
                              ort.__version__)
    return ref, seen


# --- the run ----------------------------------------------------------------------------------
def run(sk: Run, model: Any, names: list[str],
        run_targets: Callable[[Any, list[str]], list[TargetReport]]) -> Report:
    """The set to every target (module docstring): ``run_targets`` converts and checks one
    graph's context on the given targets (mtconvert.run.convert.run_targets)."""
    opts = sk.opts
    s = open_set(Path(model), opts.task)
    speech = s.folder.task == "automatic-speech-recognition"
    refuse_unsupported(opts, features=speech)
    for flag, value, why in (
            ("--bundle", opts.bundle, "no golden bundle of its graphs yet"),
            ("--max-cache", opts.max_cache, "its graphs keep their own growing cache")):
        if value is not None:
            raise UsageError(f"{flag}: not available for an encoder-decoder Optimum set ({why})")
    if opts.max_new_tokens < 2:
        raise UsageError("--max-new-tokens must be at least 2 for an encoder-decoder Optimum "
                         "set (its decoder-with-past graph runs from the second token on)")
    feeds, shown, how = encdec.encoder_input(s.folder, opts)
    if not speech:
        feeds["attention_mask"] = np.ones_like(feeds["input_ids"])
    start = reference.decoder_start(s.folder.config, s.folder.label)
    sk.opts = opts = replace(opts, inputs=None)
    geo = replace(s.geometry, max_cache=opts.max_new_tokens)  # the cache's length at the end
    with tempfile.TemporaryDirectory(prefix="mtconvert-") as tmp:
        work = Path(tmp)
        sk.say(f"loading {s.folder.label} (Optimum ONNX set: "
               f"{', '.join(p.name for p in s.graphs.values())})")
        sk.say(f"reference: greedy decode of {opts.max_new_tokens} tokens, the set's graphs in "
               "ONNX Runtime")
        ref, seen = greedy(s, feeds, start, opts.max_new_tokens, opts.threads)
        sk.clock.lap("load_source_s")
        sk.settings["generation"] = {
            "task": s.folder.task, "prompt": how, "max_new_tokens": opts.max_new_tokens,
            "reference": f"{ref.runtime} {ref.version}", "decoder_start_token_id": start,
            "source_graphs": [f.name for f in s.folder.weights],
            "graphs": list(s.graphs), "cache": "growing (the set's own graphs as they are)"}
        ctxs = {role: _graph(sk if role == "with_past" else Run("convert", opts, sk.registry,
                                                                 sk.say),
                             s, role, seen[role], work) for role in s.graphs}
        sk.clock.lap("reference_s")
        dynamic = [n for n in names if not sk.registry.get(n).fixed_shapes]
        reports = {role: dict(zip(dynamic, run_targets(ctx, dynamic), strict=True))
                   for role, ctx in ctxs.items()}
        judged = [_judged(ctxs, {role: r[n] for role, r in reports.items()}, ref, geo,
                          (feeds, shown)) if n in reports["with_past"] else _static(n, opts)
                  for n in names]
        point = sk.point()  # the with-past graph's (made by _graph, cached)
        source = replace(sk.source_info(point), path=str(s.folder.path),
                         sha256=s.folder.sha256, format="optimum-onnx")
        return sk.report(judged, point, source)


def _graph(sk: Run, s: Seq2SeqSet, role: str, feeds: dict[str, np.ndarray],
           work: Path) -> Any:
    """One of the set's graphs loaded by ``sk`` as it is, its example inputs the reference's
    own feeds at its last run; its run context."""
    (work / role).mkdir()
    src = sk.load(s.graphs[role], work / role)
    sk.loaded = replace(sk.loaded, example_feeds=feeds)
    src.name = f"{optimum._stem(s.folder.label)}-{role.replace('_', '-')}"
    return graph_context(sk, src, sk.point(), work / f"cache-{role}")


def _static(name: str, opts: Any) -> TargetReport:
    return TargetReport(name, "skipped", (
        f"{name} runs fixed shapes only: an encoder-decoder Optimum set's decoder-with-past graph "
        "has no decoder self-attention mask and derives its positions from the past's length, "
        "so its cache cannot be padded to a fixed length without changing what it computes; "
        "convert the model's Hugging Face folder (config.json + model.safetensors), from which "
        "mtconvert builds fixed-cache graphs for every target"), precision=opts.precision)


def _judged(ctxs: dict[str, Any], reports: dict[str, TargetReport], ref: reference.Reference,
            geo: Geometry, encoder: tuple[dict[str, np.ndarray], list[int] | None]
            ) -> TargetReport:
    """One target's graphs generated together; the decoder's and encoder's reports
    folded into the with-past one's, each graph's check under ``generation.graphs``."""
    step = reports["with_past"]
    files = {role: _artifact_file(r) for role, r in reports.items()}
    done = step
    if all(files.values()):
        ctx = ctxs["with_past"]
        backend = ctx.registry.get(step.name)()
        ctx.say(f"{step.name}: generating {len(ref.tokens)} tokens with the set's growing cache")
        try:
            with tempfile.TemporaryDirectory(prefix="mtconvert-gen-art-") as tmp:
                arts = {role: converted(ctxs[role], backend, r, Path(files[role].path),
                                        Path(tmp) / role) for role, r in reports.items()}
                done = generated(ctx.opts, backend, arts["with_past"], step, ref, geo,
                                 encoder=EncoderInput(arts["encoder"], *encoder),
                                 growing={"decoder": arts.get("decoder", arts["with_past"]),
                                          "with_past": arts["with_past"]})
        except MtConvertError as exc:  # an artifact could not be described again
            done = replace(step, status="error", reason=f"generation: {exc}")
        if done.generation is not None:
            done = replace(done, generation=done.generation | {"graphs": {
                role: encdec.graph_summary(r) for role, r in reports.items()}})
    done = encdec.merged(done, reports.get("decoder"), "decoder")
    return encdec.merged(done, reports["encoder"])
