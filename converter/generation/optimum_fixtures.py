"""ONNX sets laid out as Hugging Face Optimum exports them, made here from tiny Hugging Face
folders (mtconvert.generation.fixtures), for tests, benchmarks and the README. Optimum itself
cannot be installed beside transformers 5 (optimum-onnx pins transformers < 4.58), so this
mimics its layout and I/O naming (optimum/exporters/onnx/config.py, ``add_past_key_values``;
optimum/onnx/graph_transformations.py, ``merge_decoders``): ``model.onnx`` (inputs
``input_ids``, ``attention_mask`` over past + current, ``past_key_values.{i}.key/value``,
``position_ids``; outputs ``logits``, ``present.{i}.key/value``), or the legacy trio
``decoder_model.onnx`` / ``decoder_with_past_model.onnx`` / ``decoder_model_merged.onnx``
(an If on ``use_cache_branch``), each beside config.json. Exported with torch.export
(``torch.onnx.export(dynamo=True)``) of the model's own forward with its DynamicCache."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mtconvert.generation import fixtures

OPSET = 18


def tiny_set(kind: str, path: Path, *, layout: str = "model", seed: int = 0,
             vocab: int = 300) -> Path:
    """A tiny ``kind`` (gpt2, llama, ...) model exported into ``path`` as Optimum lays it out:
    ``layout`` "model" (model.onnx), "split" (decoder_model.onnx and
    decoder_with_past_model.onnx) or "merged" (decoder_model_merged.onnx alone). config.json
    (and generation_config.json) are copied; no weights file is left."""
    import torch

    from mtconvert.generation.folder import load_model, open_folder

    hf_dir = path.parent / f".{path.name}-hf"
    fixtures.tiny_folder(kind, hf_dir, seed=seed, vocab=vocab)
    _sharpen_self_attention(hf_dir)
    model = load_model(open_folder(hf_dir, None, False))
    path.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copy(hf_dir / name, path / name)
    with torch.no_grad():
        if layout == "model":
            export(model, path / "model.onnx", with_past=True)
        else:
            export(model, path / "decoder_model.onnx", with_past=False)
            export(model, path / "decoder_with_past_model.onnx", with_past=True)
            if layout == "merged":
                merge(path / "decoder_model.onnx", path / "decoder_with_past_model.onnx",
                      path / "decoder_model_merged.onnx")
                (path / "decoder_model.onnx").unlink()
                (path / "decoder_with_past_model.onnx").unlink()
    shutil.rmtree(hf_dir)
    return path


def _sharpen_self_attention(hf_dir: Path) -> None:
    """Query/key maps at a trained-like spread (fixtures._sharpen_attention), saved back: the
    cache steers the decode and greedy steps are not near-ties."""
    from mtconvert.generation.folder import load_model, open_folder

    model = load_model(open_folder(hf_dir, None, False))
    import torch

    with torch.no_grad():
        fixtures._sharpen_attention(model)
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.endswith(("c_attn.weight",)):  # GPT-2's fused q/k/v
                p.normal_(0.0, 0.4)
    model.save_pretrained(str(hf_dir))


class _Forward:
    """The model's forward with a flat cache, as Optimum's exported graph takes it."""

    @staticmethod
    def module(model: Any, layers: int, with_past: bool) -> Any:
        import torch
        from transformers.cache_utils import DynamicCache

        class Forward(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, *past):
                cache = DynamicCache(config=model.config)
                if with_past:
                    for i in range(layers):
                        cache.update(past[2 * i], past[2 * i + 1], i)
                out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=cache,
                                 use_cache=True)
                flat = []
                for layer in out.past_key_values.layers:
                    flat += [layer.keys, layer.values]
                return (out.logits, *flat)

        return Forward().eval()


def _geometry(model: Any) -> tuple[int, int, int]:
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return layers, kv, getattr(cfg, "head_dim", None) or hidden // heads


def export(model: Any, out: Path, *, with_past: bool) -> Path:
    """``out``: the model's forward, Optimum's names; dynamic batch, sequence and past
    lengths."""
    import torch

    layers, kv, head_dim = _geometry(model)
    seq, past_len = (2, 3) if with_past else (3, 0)
    ids = torch.arange(1, seq + 1).reshape(1, seq)
    mask = torch.ones(1, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq).reshape(1, seq)
    past = [torch.randn(1, kv, past_len, head_dim) for _ in range(2 * layers)] if with_past \
        else []
    past_names = [f"past_key_values.{i}.{kv_}" for i in range(layers) for kv_ in ("key", "value")]
    present = [f"present.{i}.{kv_}" for i in range(layers) for kv_ in ("key", "value")]
    batch, s = torch.export.Dim("batch_size", max=8), torch.export.Dim("sequence_length",
                                                                         max=512)
    p = torch.export.Dim("past_sequence_length", max=512)
    total = torch.export.Dim("total_sequence_length", max=1024)
    shapes: list[Any] = [{0: batch, 1: s}, {0: batch, 1: total if with_past else s},
                         {0: batch, 1: s}]
    if past:
        shapes.append(tuple({0: batch, 2: p} for _ in past))  # the *past tuple
    torch.onnx.export(_Forward.module(model, layers, with_past), (ids, mask, pos, *past),
                      str(out), dynamo=True, opset_version=OPSET, external_data=False,
                      input_names=["input_ids", "attention_mask", "position_ids",
                                   *(past_names if with_past else [])],
                      output_names=["logits", *present], dynamic_shapes=tuple(shapes),
                      verbose=False)
    _optimum_order(out)
    return out


def _optimum_order(path: Path) -> None:
    """Inputs in Optimum's order: input_ids, attention_mask, the past, then position_ids
    (TextDecoderWithPositionIdsOnnxConfig adds it last)."""
    import onnx

    model = onnx.load(str(path))
    ins = list(model.graph.input)
    ordered = [i for i in ins if i.name != "position_ids"] + [i for i in ins
                                                              if i.name == "position_ids"]
    del model.graph.input[:]
    model.graph.input.extend(ordered)
    onnx.save(model, str(path))


def merged_copy(src: Path, out: Path) -> Path:
    """A merged set from a ``model.onnx`` set without exporting again (tests): both branches
    of the If are that with-past graph (run with an empty past, it is the no-past pass), so the
    layout and the ``use_cache_branch`` switch are Optimum's, the else branch is not."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return merge(src / "model.onnx", src / "model.onnx", out / "decoder_model_merged.onnx")


def merge(decoder: Path, with_past: Path, out: Path) -> Path:
    """Optimum's ``merge_decoders`` in short: both graphs as the branches of one If on
    ``use_cache_branch`` (then: with past), every input of either graph an input."""
    import onnx
    from onnx import helper

    no_past, past = onnx.load(str(decoder)), onnx.load(str(with_past))
    for m, tag in ((no_past, "no_past"), (past, "with_past")):  # initializers kept apart
        renames = {i.name: f"{i.name}__{tag}" for i in m.graph.initializer}
        for i in m.graph.initializer:
            i.name = renames[i.name]
        for node in m.graph.node:
            node.input[:] = [renames.get(n, n) for n in node.input]
    inputs = {i.name: i for i in [*no_past.graph.input, *past.graph.input]}
    flag = helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1])
    branch = {tag: helper.make_graph(m.graph.node, tag, [], m.graph.output)
              for m, tag in ((no_past, "no_past"), (past, "with_past"))}
    node = helper.make_node("If", ["use_cache_branch"], [o.name for o in past.graph.output],
                            name="optimum::if", then_branch=branch["with_past"],
                            else_branch=branch["no_past"])
    graph = helper.make_graph([node], "merged", [*inputs.values(), flag], past.graph.output,
                              [*no_past.graph.initializer, *past.graph.initializer])
    model = helper.make_model(graph, opset_imports=past.opset_import, ir_version=past.ir_version)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


# --- encoder-decoder sets ---------------------------------------------------------------------
# Optimum's names (optimum-onnx, optimum/exporters/onnx/base.py, OnnxSeq2SeqConfigWithPast:
# ``torch_to_onnx_input_map``, ``add_past_key_values``; config.py, TextSeq2SeqOnnxConfig):
# encoder_model.onnx (input_ids, attention_mask -> last_hidden_state); decoder_model.onnx
# (input_ids, encoder_attention_mask, encoder_hidden_states -> logits,
# present.{i}.decoder.key/value, present.{i}.encoder.key/value); decoder_with_past_model.onnx
# (input_ids, encoder_attention_mask, past_key_values.{i}.decoder/encoder.key/value -> logits,
# present.{i}.decoder.key/value: the cross K/V are constant, not output again).
def tiny_seq2seq_set(kind: str, path: Path, *, layout: str = "split", seed: int = 0,
                     vocab: int = 300) -> Path:
    """A tiny encoder-decoder ``kind`` (t5, bart, marian, whisper) exported into ``path`` as
    Optimum lays it out: encoder_model.onnx (Whisper's: input_features -> last_hidden_state),
    and decoder_model.onnx + decoder_with_past_model.onnx (``layout`` "split") or
    decoder_model_merged.onnx alone ("merged"), beside config.json; no weights file."""
    import torch

    from mtconvert.generation.folder import load_model, open_folder

    hf_dir = path.parent / f".{path.name}-hf"
    fixtures.tiny_folder(kind, hf_dir, seed=seed, vocab=vocab)
    model = load_model(open_folder(hf_dir, None, False)).eval()
    path.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copy(hf_dir / name, path / name)
    with torch.no_grad():
        _export_encoder(model, path / "encoder_model.onnx")
        for with_past in (False, True):
            _export_decoder(model, path / ("decoder_with_past_model.onnx" if with_past
                                           else "decoder_model.onnx"), with_past)
    if layout == "merged":
        merge_seq2seq(path / "decoder_model.onnx", path / "decoder_with_past_model.onnx",
                      path / "decoder_model_merged.onnx")
        (path / "decoder_model.onnx").unlink()
        (path / "decoder_with_past_model.onnx").unlink()
    shutil.rmtree(hf_dir)
    return path


def merge_seq2seq(decoder: Path, with_past: Path, out: Path) -> Path:
    """Optimum's ``merge_decoders(strict=False)`` for an encoder-decoder: the with-past graph
    first given the outputs it lacks (present.{i}.encoder.*) as empty constants, the batch axis
    0 and the sequence axis 1 (optimum/onnx/transformations_utils.py, ``_unify_onnx_outputs``),
    in the decoder's output order; then both graphs the branches of one If (``merge``)."""
    import onnx
    from onnx import helper, numpy_helper

    import numpy as np

    first, past = onnx.load(str(decoder)), onnx.load(str(with_past))
    have = {o.name: o for o in past.graph.output}
    for o in first.graph.output:
        if o.name not in have:
            dims = [d.dim_value if d.HasField("dim_value") else (0 if i == 0 else 1)
                    for i, d in enumerate(o.type.tensor_type.shape.dim)]
            past.graph.node.append(helper.make_node(
                "Constant", [], [o.name], name=f"optimum::empty::{o.name}",
                value=numpy_helper.from_array(np.zeros(dims, np.float32))))
    del past.graph.output[:]
    past.graph.output.extend(first.graph.output)
    patched = out.with_name(f".{with_past.name}")
    onnx.save(past, str(patched))
    try:
        return merge(decoder, patched, out)
    finally:
        patched.unlink()


def _seq2seq_geometry(model: Any) -> tuple[int, int, int]:
    """(decoder layers, heads, head dim)."""
    cfg = model.config
    layers = getattr(cfg, "num_decoder_layers", None) or cfg.decoder_layers
    heads = getattr(cfg, "num_heads", None) or cfg.decoder_attention_heads
    return layers, heads, getattr(cfg, "d_kv", None) or cfg.d_model // heads


def _dims() -> dict[str, Any]:
    import torch

    return {n: torch.export.Dim(n, max=512) for n in (
        "encoder_sequence_length", "decoder_sequence_length", "past_decoder_sequence_length")} \
        | {"batch_size": torch.export.Dim("batch_size", max=8)}


def _export_encoder(model: Any, out: Path) -> None:
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *feeds):
            names = ("input_features",) if len(feeds) == 1 else ("input_ids", "attention_mask")
            return self.model.get_encoder()(**dict(zip(names, feeds))).last_hidden_state

    d, cfg = _dims(), model.config
    axes = {0: d["batch_size"], 1: d["encoder_sequence_length"]}
    if cfg.model_type == "whisper":  # log-mel frames fixed at 2 x max_source_positions
        feeds = (torch.randn(1, cfg.num_mel_bins, 2 * cfg.max_source_positions),)
        names, shapes = ["input_features"], ({0: d["batch_size"]},)
    else:
        ids = torch.arange(1, 6).reshape(1, 5)
        feeds, names, shapes = (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], \
            (axes, axes)
    torch.onnx.export(Encoder().eval(), feeds, str(out), dynamo=True, opset_version=OPSET,
                      external_data=False, input_names=names,
                      output_names=["last_hidden_state"], dynamic_shapes=(shapes,),
                      verbose=False)


def _export_decoder(model: Any, out: Path, with_past: bool) -> None:
    """The decoder with its EncoderDecoderCache flattened in Optimum's order (per layer:
    decoder key, value, encoder key, value); the with-past graph outputs only the decoder's
    presents, and an input no node reads (encoder_hidden_states, with past) is dropped, as in
    Optimum's exports."""
    import torch

    layers, heads, head_dim = _seq2seq_geometry(model)

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states, *past):
            from transformers.cache_utils import DynamicCache, EncoderDecoderCache

            cfg = model.config
            cache = EncoderDecoderCache(DynamicCache(config=cfg), DynamicCache(config=cfg))
            for i in range(layers if with_past else 0):
                cache.self_attention_cache.update(past[4 * i], past[4 * i + 1], i)
                cache.cross_attention_cache.update(past[4 * i + 2], past[4 * i + 3], i)
                cache.is_updated[i] = True
            out = self.model(encoder_outputs=(encoder_hidden_states,),
                             attention_mask=encoder_attention_mask, decoder_input_ids=input_ids,
                             past_key_values=cache, use_cache=True)
            kv = out.past_key_values
            flat = []
            for i in range(layers):
                flat += [kv.self_attention_cache.layers[i].keys,
                         kv.self_attention_cache.layers[i].values]
                if not with_past:
                    flat += [kv.cross_attention_cache.layers[i].keys,
                             kv.cross_attention_cache.layers[i].values]
            return (out.logits, *flat)

    d = _dims()
    enc_len = 5 if model.config.model_type != "whisper" else model.config.max_source_positions
    b, es = d["batch_size"], d["encoder_sequence_length"]
    parts = ("decoder.key", "decoder.value", "encoder.key", "encoder.value")
    past = [torch.randn(1, heads, 3 if j % 4 < 2 else enc_len, head_dim)
            for j in range(4 * layers)] if with_past else []
    past_axes = tuple({0: b, 2: d["past_decoder_sequence_length"] if j % 4 < 2 else es}
                      for j in range(len(past)))
    present = [f"present.{i}.{p}" for i in range(layers) for p in parts
               if not (with_past and p.startswith("encoder"))]
    ids = torch.tensor([[4]]) if with_past else torch.tensor([[0, 4]])
    torch.onnx.export(
        Decoder().eval(), (ids, torch.ones(1, enc_len, dtype=torch.int64),
                           torch.randn(1, enc_len, model.config.d_model), *past),
        str(out), dynamo=True, opset_version=OPSET, external_data=False,
        input_names=["input_ids", "encoder_attention_mask", "encoder_hidden_states",
                     *(f"past_key_values.{i}.{p}" for i in range(len(past) // 4)
                       for p in parts)],
        output_names=["logits", *present], verbose=False,
        dynamic_shapes=({0: b} if with_past else {0: b, 1: d["decoder_sequence_length"]},
                        {0: b, 1: es}, {0: b, 1: es}, *((past_axes,) if past else ())))
    _drop_unused_inputs(out)


def _drop_unused_inputs(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    used = {x for n in model.graph.node for x in n.input}
    keep = [i for i in model.graph.input if i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.save(model, str(path))
