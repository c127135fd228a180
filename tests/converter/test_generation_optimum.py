"""ONNX sets laid out as Optimum exports them (mtconvert.generation.optimum, and
.optimum_seq2seq for encoder-decoder sets): made here from tiny seeded models by
optimum_fixtures (Optimum itself cannot be installed beside transformers 5), the static step
graph checked against the set's own decode in ONNX Runtime, an encoder-decoder set's growing
cache reference against the original model, bad input, and targets end to end, judged by the
tokens they generate."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtconvert.generation import optimum
from mtconvert.generation.optimum_fixtures import merged_copy, tiny_set
from mtconvert.validators import gates
from mtconvert.validators.tolerances import PROFILES
from tests.cli_checks import assert_usage_error

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
PROMPT = (5, 17, 42)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimum")
    gpt2 = tiny_set("gpt2", root / "gpt2-optimum")
    return {"gpt2": gpt2, "llama": tiny_set("llama", root / "llama-optimum"),
            "gpt2-merged": merged_copy(gpt2, root / "gpt2-merged").parent}


def _cli(*args):
    return subprocess.run([MTCONVERT, *map(str, args)], capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)


def test_sets_have_optimums_layout(sets):
    """The exporter writes Optimum's file names and I/O names, and no weights file."""
    import onnx

    m = onnx.load(str(sets["gpt2"] / "model.onnx"), load_external_data=False)
    ins, outs = [i.name for i in m.graph.input], [o.name for o in m.graph.output]
    assert ins == ["input_ids", "attention_mask",
                   *(f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")),
                   "position_ids"]
    assert outs == ["logits", *(f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value"))]
    merged = onnx.load(str(sets["gpt2-merged"] / "decoder_model_merged.onnx"))
    assert [n.op_type for n in merged.graph.node] == ["If"]
    assert merged.graph.input[-1].name == "use_cache_branch"
    assert sorted(p.name for p in sets["gpt2-merged"].iterdir()) == [
        "config.json", "decoder_model_merged.onnx", "generation_config.json"]
    assert all(optimum.is_optimum_set(s) for s in sets.values())


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt2-merged"])
def test_static_step_graph_reproduces_the_sets_own_decode(kind, sets, tmp_path):
    """The surgery's graph, stepped with the host loop's padded cache, gives the logits of the
    set's own graphs run with their growing cache (fp32 profile; measured ~1e-5 of logits
    ~20), and free-running it generates the same tokens."""
    from mtconvert.generation.loop import decode

    s = optimum.open_set(sets[kind], None)
    geo = optimum.static_step(s, 16, tmp_path / "step.onnx")
    ref = optimum.greedy(s, geo, PROMPT, 8)
    assert ref.logits.shape == (len(PROMPT) + 7, geo.vocab)
    assert len(set(ref.tokens)) > 2  # sharpened weights: greedy does not repeat one token
    forced = optimum.forced_logits(tmp_path / "step.onnx", geo, ref)
    verdict = gates.judge({"logits": ref.logits}, {"logits": forced},
                          lambda _n: PROFILES["fp32"])
    assert verdict.passed, verdict.outputs
    sess = optimum._Graph(tmp_path / "step.onnx", 1).sess
    names = [o.name for o in sess.get_outputs()]
    free = decode(lambda f: dict(zip(names, sess.run(None, f))), geo, PROMPT, 8)
    assert tuple(free.tokens) == ref.tokens
    assert names == geo.output_names() and [i.name for i in sess.get_inputs()] == \
        geo.input_names()


@pytest.mark.sweep
@pytest.mark.parametrize("layout", ["split", "merged"])
def test_exported_legacy_layouts_reproduce_the_sets_own_decode(layout, tmp_path):
    """Optimum's legacy trio exported for real (decoder_model.onnx runs the prompt; a merged
    file whose else branch is the no-past graph): the static step graph still matches."""
    s = optimum.open_set(tiny_set("gpt2", tmp_path / layout, layout=layout), None)
    assert s.prefill.name == ("decoder_model.onnx" if layout == "split"
                              else "decoder_model_merged.onnx")
    geo = optimum.static_step(s, 16, tmp_path / "step.onnx")
    ref = optimum.greedy(s, geo, PROMPT, 8)
    forced = optimum.forced_logits(tmp_path / "step.onnx", geo, ref)
    assert gates.judge({"logits": ref.logits}, {"logits": forced},
                       lambda _n: PROFILES["fp32"]).passed


def test_a_broken_surgery_is_caught(sets, tmp_path):
    """The check the run relies on sees a step graph whose mask does not mask: the empty
    slots' keys set to garbage change the logits beyond the fp32 profile."""
    from mtconvert.generation.loop import decode

    s = optimum.open_set(sets["llama"], None)
    geo = optimum.static_step(s, 16, tmp_path / "step.onnx")
    ref = optimum.greedy(s, geo, PROMPT, 6)
    sess = optimum._Graph(tmp_path / "step.onnx", 1).sess
    names = [o.name for o in sess.get_outputs()]

    def unmasked(feeds):
        feeds = dict(feeds, attention_mask=np.ones_like(feeds["attention_mask"]))
        return dict(zip(names, sess.run(None, feeds)))

    got = decode(unmasked, geo, ref.prompt, len(ref.tokens), forced=ref.tokens)
    assert not gates.judge({"logits": ref.logits}, {"logits": got.logits},
                           lambda _n: PROFILES["fp32"]).passed


def test_prompt_text_goes_through_the_sets_tokenizer(sets, tmp_path):
    """A set with tokenizer.json takes --prompt like a model folder (Optimum copies the
    tokenizer beside the graphs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mtconvert.generation import reference

    d = tmp_path / "with-tokenizer"
    shutil.copytree(sets["gpt2"], d)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 5, "world": 17}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    s = optimum.open_set(d, None)
    ids, how = reference.prompt_ids(s.folder, "hello world", None, 300)
    assert ids == (5, 17) and "tokenizer.json" in how


def _graph(path, inputs, outputs):
    """A one-node ONNX file with these I/O names (what detection and refusal read)."""
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, None, 8]) for n in inputs]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, None, 8])
            for n in outputs]
    nodes = [helper.make_node("Identity", [inputs[0]], [o]) for o in outputs]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", ins, outs)), str(path))


def _variants(tmp, sets):
    src = sets["gpt2"]
    out = {}
    for name in ("nopast", "seq2seq", "renamed"):
        out[name] = tmp / name
        out[name].mkdir()
        shutil.copy(src / "config.json", out[name] / "config.json")
    _graph(out["nopast"] / "decoder_model.onnx", ["input_ids"], ["logits"])
    for f in ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"):
        _graph(out["seq2seq"] / f, ["input_ids"], ["logits"])
    import onnx

    m = onnx.load(str(src / "model.onnx"))
    old, new = "past_key_values.1.value", "cache.1.value"
    for i in m.graph.input:
        i.name = new if i.name == old else i.name
    for n in m.graph.node:
        n.input[:] = [new if x == old else x for x in n.input]
    onnx.save(m, str(out["renamed"] / "model.onnx"))
    return out


@pytest.mark.parametrize("case,args,needle", [
    ("nopast", [], "no decoder-with-past graph"),
    ("seq2seq", [], "not Optimum's decoder I/O layout (unknown: -; missing: "
                    "encoder_hidden_states)"),
    ("renamed", [], "not Optimum's decoder I/O layout (unknown: cache.1.value"),
    ("gpt2", ["--prompt-ids", "1,2,3,4,5", "--max-cache", "4"], "longer than --max-cache 4"),
    ("gpt2", ["--task", "text2text-generation"], "is a decoder-only Optimum set"),
])
def test_bad_input_exits_2_with_one_line(case, args, needle, tmp_path, sets):
    folder = sets["gpt2"] if case == "gpt2" else _variants(tmp_path, sets)[case]
    out = tmp_path / "out"
    proc = _cli(folder, "--to", "onnx-mobile", "--out", out, *args)
    assert_usage_error(proc, needle, out)


def _convert(folder, targets, tmp_path, *extra):
    report_path = tmp_path / "report.json"
    proc = _cli(folder, "--to", targets, "--prompt-ids", ",".join(map(str, PROMPT)),
                "--max-new-tokens", "8", "--out", tmp_path / "out", "--report-json",
                report_path, "-q", "--iterations", "3", "--warmup", "1", "--jobs", "1", *extra)
    assert report_path.is_file(), proc.stderr[-3000:]
    return proc, json.loads(report_path.read_text())


def _generated_the_reference(target):
    gen = target["generation"]
    first = gen["first_mismatch_step"]
    agreed = gen["target_tokens"] if first is None else gen["target_tokens"][:first]
    return (gen["passed"] and agreed == gen["reference_tokens"][:len(agreed)]
            and (first is None or gen["first_mismatch_is_tie"]))


@pytest.mark.slow
def test_gpt2_set_to_onnx_mobile_and_tflite(sets, tmp_path):
    """The representative end-to-end case: the set's static step graph through ORT mobile and
    a static-shape target, each generating the set's own greedy tokens with its KV cache."""
    from mtconvert.registry import default_registry

    if not default_registry().get("tflite").availability().can_convert:
        pytest.skip("tflite is not installed here")
    proc, report = _convert(sets["gpt2"], "onnx-mobile,tflite", tmp_path, "--bundle",
                            tmp_path / "gold")
    assert report["source"]["format"] == "optimum-onnx"
    settings = report["settings"]["generation"]
    assert settings["reference"].startswith("onnxruntime (the set's own graphs")
    assert settings["step_graph_max_abs_error"] <= PROFILES["fp32"].atol
    assert settings["source_graphs"] == ["model.onnx"] and settings["max_cache"] == 16
    by_name = {t["name"]: t for t in report["targets"]}
    for name in ("onnx-mobile", "tflite"):
        t = by_name[name]
        assert t["status"] == "passed" and _generated_the_reference(t), (name, t["reason"])
        assert t["generation"]["steps"] == 8 and "skipped" not in t["generation"]
    assert by_name["onnx-mobile"]["generation"]["tokens_agree"] == 1.0
    assert (tmp_path / "out" / "gpt2-optimum-step.ort").is_file()
    assert (tmp_path / "out" / "gpt2-optimum-step.tflite").is_file()
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the golden bundle carries the set's reference: verify steps the artifact without the set
    verified = _cli("verify", tmp_path / "gold" / "onnx-mobile", "--report-json",
                    tmp_path / "verify.json", "-q")
    assert verified.returncode == 0, verified.stderr[-3000:]
    again = json.loads((tmp_path / "verify.json").read_text())["targets"][0]["generation"]
    assert again["reference_tokens"] == by_name["onnx-mobile"]["generation"]["reference_tokens"]
    assert again["tokens_agree"] == 1.0


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("kind,targets", [
    ("llama", "onnx-mobile,tflite,executorch,ncnn"), ("gpt2-merged", "onnx-mobile,tflite"),
    ("gpt2", "ncnn,coreml,executorch")])
def test_every_target_and_family(kind, targets, sets, tmp_path):
    """Every family and layout, every target generates the reference's tokens (ncnn too: the
    lowering reads the float mask cast to integers as 0/1, and a decode step's one-row Gemm
    inputs are made [1, K])."""
    proc, report = _convert(sets[kind], targets, tmp_path)
    for t in report["targets"]:
        if t["status"] == "skipped":
            continue  # not installed here: the report says so
        assert t["status"] == "passed" and _generated_the_reference(t), (t["name"], t["reason"])
    statuses = {t["status"] for t in report["targets"]}
    assert proc.returncode == (0 if statuses <= {"passed", "skipped"} else 3), statuses


# --- encoder-decoder sets (mtconvert.generation.optimum_seq2seq) ------------------------------
ENC_PROMPT = (5, 17, 33, 2, 9, 41)
T5_SEED = 1  # seed 0's tiny T5 repeats one token after the first (measured); seed 1 does not


@pytest.fixture(scope="module")
def s2s(tmp_path_factory):
    from mtconvert.generation.optimum_fixtures import tiny_seq2seq_set

    return {"t5": tiny_seq2seq_set("t5", tmp_path_factory.mktemp("optimum-s2s") / "t5-optimum",
                                   seed=T5_SEED)}


class _Sets(dict):
    """The other families' sets, each exported the first time a (sweep) test asks for it."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, key):
        from mtconvert.generation.optimum_fixtures import tiny_seq2seq_set

        kind, _, layout = key.partition("-")
        self[key] = tiny_seq2seq_set(kind, self.root / f"{key}-optimum", layout=layout or "split")
        return self[key]


@pytest.fixture(scope="module")
def s2s_more(tmp_path_factory):
    return _Sets(tmp_path_factory.mktemp("optimum-s2s-more"))


def _seq2seq_reference(folder, kind, tmp_path, seed=0):
    """(the set's ONNX Runtime reference with its growing cache, each graph's last feeds, the
    original model's PyTorch greedy decode: the same seeded tiny folder)."""
    from mtconvert.generation import fixtures, optimum_seq2seq
    from mtconvert.generation.folder import load_model, open_folder
    from mtconvert.generation.reference import greedy_seq2seq

    s = optimum_seq2seq.open_set(folder, None)
    cfg = s.folder.config
    if kind == "whisper":
        feeds = {"input_features": np.random.default_rng(0).standard_normal(
            (1, cfg["num_mel_bins"], 2 * cfg["max_source_positions"])).astype(np.float32)}
    else:
        feeds = {"input_ids": np.array([ENC_PROMPT], np.int64)}
    start = cfg["decoder_start_token_id"]
    mask = {"attention_mask": np.ones_like(feeds["input_ids"])} if "input_ids" in feeds else {}
    ref, seen = optimum_seq2seq.greedy(s, feeds | mask, start, 8)
    hf = load_model(open_folder(fixtures.tiny_folder(kind, tmp_path / "hf", seed=seed), None,
                                False))
    return ref, seen, greedy_seq2seq(hf, feeds, start, 8)


def test_seq2seq_set_has_optimums_names_and_its_reference_is_the_models_decode(s2s, tmp_path):
    """The exporter writes Optimum's three graphs and I/O names; the reference (the set's own
    graphs in ONNX Runtime, growing cache, the cross K/V from the first pass) gives the
    original model's PyTorch greedy decode, logits within the fp32 profile (measured ~1e-4 of
    logits ~6)."""
    import onnx

    def io(name):
        m = onnx.load(str(s2s["t5"] / name), load_external_data=False)
        return [i.name for i in m.graph.input], [o.name for o in m.graph.output]

    kv = [f"{p}.{x}" for p in ("decoder", "encoder") for x in ("key", "value")]
    assert io("encoder_model.onnx") == (["input_ids", "attention_mask"], ["last_hidden_state"])
    assert io("decoder_model.onnx") == (
        ["input_ids", "encoder_attention_mask", "encoder_hidden_states"],
        ["logits", *(f"present.{i}.{x}" for i in range(2) for x in kv)])
    assert io("decoder_with_past_model.onnx") == (
        ["input_ids", "encoder_attention_mask",
         *(f"past_key_values.{i}.{x}" for i in range(2) for x in kv)],
        ["logits", *(f"present.{i}.decoder.{x}" for i in range(2) for x in ("key", "value"))])
    assert not any(p.suffix in (".safetensors", ".bin") for p in s2s["t5"].iterdir())
    ref, seen, torch_ref = _seq2seq_reference(s2s["t5"], "t5", tmp_path, T5_SEED)
    assert ref.tokens == torch_ref.tokens and ref.logits.shape == torch_ref.logits.shape
    assert len(set(ref.tokens)) > 2  # not one token repeated
    verdict = gates.judge({"logits": torch_ref.logits}, {"logits": ref.logits},
                          lambda _n: PROFILES["fp32"])
    assert verdict.passed, verdict.outputs
    assert set(seen) == {"encoder", "decoder", "with_past"}
    assert seen["with_past"]["past_key_values.0.decoder.key"].shape[2] == 7  # grown to step 8


def _s2s_variants(tmp, src):
    import onnx

    out = {name: tmp / name for name in ("nowithpast", "renamed")}
    for name, folder in out.items():
        shutil.copytree(src, folder)
    (out["nowithpast"] / "decoder_with_past_model.onnx").unlink()
    path = out["renamed"] / "decoder_with_past_model.onnx"
    m = onnx.load(str(path))
    old, new = "past_key_values.1.encoder.key", "cache.1.encoder.key"
    for i in m.graph.input:
        i.name = new if i.name == old else i.name
    for n in m.graph.node:
        n.input[:] = [new if x == old else x for x in n.input]
    onnx.save(m, str(path))
    return out


@pytest.mark.parametrize("case,args,needle", [
    ("nowithpast", [], "missing decoder_with_past_model.onnx"),
    ("renamed", [], "not Optimum's with-past I/O layout (unknown: cache.1.encoder.key"),
    ("t5", ["--max-cache", "16"], "--max-cache: not available for an encoder-decoder"),
    ("t5", ["--task", "text-generation"], "supported for text2text-generation"),
    ("t5", ["--max-new-tokens", "1"], "--max-new-tokens must be at least 2"),
    ("t5", ["--task", "automatic-speech-recognition"], "takes attention_mask, input_ids, not "
                                                       "input_features"),
])
def test_seq2seq_bad_input_exits_2_with_one_line(case, args, needle, tmp_path, s2s):
    folder = s2s["t5"] if case == "t5" else _s2s_variants(tmp_path, s2s["t5"])[case]
    out = tmp_path / "out"
    proc = _cli(folder, "--to", "onnx-mobile", "--out", out, *args)
    assert_usage_error(proc, needle, out)


def _seq2seq_judged(report, dynamic, static, roles=None):
    """Each dynamic-shape target generated the set's own tokens through its artifacts (one
    per graph: ``roles``); each fixed-shape one skipped with the reason and the advice."""
    roles = roles or {"with_past", "decoder", "encoder"}
    by_name = {t["name"]: t for t in report["targets"]}
    for name in dynamic:
        t = by_name[name]
        assert t["status"] == "passed" and _generated_the_reference(t), (name, t["reason"])
        graphs = t["generation"]["graphs"]
        assert set(graphs) == roles
        assert all(g["status"] == "passed" for g in graphs.values()), graphs
        assert {a["role"] for a in t["artifacts"]} >= roles - {"with_past"} | {"artifact"}
        assert t["generation"]["encoder_ms"] > 0 and t["generation"]["steps"] == 8
    for name in static:
        t = by_name[name]
        assert t["status"] == "skipped" and t["generation"] is None and not t["artifacts"]
        assert "runs fixed shapes only" in t["reason"] and "Hugging Face folder" in t["reason"]


@pytest.mark.slow
def test_t5_set_generates_on_onnx_mobile_and_tflite_says_why_not(s2s, tmp_path):
    """The representative encoder-decoder case: the set's three graphs through ORT mobile as
    they are, generating with their growing cache; a fixed-shape target skipped with the
    reason (exit 1: a skipped target is not a pass)."""
    proc, report = _convert(s2s["t5"], "onnx-mobile,tflite", tmp_path)
    assert report["source"]["format"] == "optimum-onnx"
    settings = report["settings"]["generation"]
    assert settings["reference"].startswith("onnxruntime (the set's own graphs, growing")
    assert settings["source_graphs"] == ["decoder_model.onnx", "decoder_with_past_model.onnx",
                                         "encoder_model.onnx"]
    _seq2seq_judged(report, ["onnx-mobile"], ["tflite"])
    for role in ("with-past", "decoder", "encoder"):
        assert (tmp_path / "out" / f"t5-optimum-{role}.ort").is_file()
    gen = report["targets"][0]["generation"]
    assert gen["prompt_tokens"] == list(PROMPT) and len(set(gen["reference_tokens"])) > 2
    assert proc.returncode == 1, proc.stderr[-3000:]


def test_merged_seq2seq_set_decodes_as_the_split_one(s2s, tmp_path):
    """decoder_model_merged.onnx alone (merge_decoders' layout: an If on use_cache_branch, the
    with-past branch's encoder presents empty constants) gives the split set's decode: the
    first pass takes empty pasts, the cross K/V are kept from it."""
    from mtconvert.generation import optimum_seq2seq
    from mtconvert.generation.optimum_fixtures import merge_seq2seq

    merged = tmp_path / "t5-merged"
    merged.mkdir()
    for name in ("config.json", "encoder_model.onnx"):
        shutil.copy(s2s["t5"] / name, merged / name)
    merge_seq2seq(s2s["t5"] / "decoder_model.onnx", s2s["t5"] / "decoder_with_past_model.onnx",
                  merged / "decoder_model_merged.onnx")
    s = optimum_seq2seq.open_set(merged, None)
    assert s.merged and set(s.graphs) == {"with_past", "encoder"}
    ids = np.array([ENC_PROMPT], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got, _ = optimum_seq2seq.greedy(s, feeds, 0, 8)
    want, _ = optimum_seq2seq.greedy(optimum_seq2seq.open_set(s2s["t5"], None), feeds, 0, 8)
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.logits, want.logits)


@pytest.mark.sweep
@pytest.mark.parametrize("kind", ["bart", "marian", "whisper"])
def test_every_seq2seq_family_reference_is_the_models_decode(kind, s2s_more, tmp_path):
    ref, _, torch_ref = _seq2seq_reference(s2s_more[kind], kind, tmp_path)
    assert ref.tokens == torch_ref.tokens
    verdict = gates.judge({"logits": torch_ref.logits}, {"logits": ref.logits},
                          lambda _n: PROFILES["fp32"])
    assert verdict.passed, verdict.outputs


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("key,targets", [
    ("bart", "onnx-mobile,ncnn"), ("whisper", "onnx-mobile,executorch"),
    ("t5-merged", "onnx-mobile,coreml")])
def test_every_seq2seq_family_and_layout(key, targets, s2s_more, tmp_path):
    """BART, Whisper (its log-mel features generated, seeded) and a merged decoder generate
    the set's own tokens on ORT mobile; each fixed-shape target says why not."""
    proc, report = _convert(s2s_more[key], targets, tmp_path) if key != "whisper" else \
        _convert_features(s2s_more[key], targets, tmp_path)
    _seq2seq_judged(report, ["onnx-mobile"], targets.split(",")[1:],
                    {"with_past", "encoder"} if key.endswith("merged") else None)
    assert proc.returncode == 1, proc.stderr[-3000:]


def _convert_features(folder, targets, tmp_path):
    report_path = tmp_path / "report.json"
    proc = _cli(folder, "--to", targets, "--max-new-tokens", "8", "--out", tmp_path / "out",
                "--report-json", report_path, "-q", "--iterations", "3", "--warmup", "1",
                "--jobs", "1")
    assert report_path.is_file(), proc.stderr[-3000:]
    return proc, json.loads(report_path.read_text())
