"""Encoder-decoder generation (issue 15): T5, BART, Marian and Whisper folders as two graphs
(encoder → cross-attention K/V; decoder-with-past step), checked against the original model
in PyTorch eager, bad input, and each family through every target that can run here (one
module-scoped run per family, all targets at once), judged by the tokens it generates."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtconvert.generation import judge as judge_mod
from mtconvert.generation.fixtures import tiny_folder
from mtconvert.validators.tolerances import PROFILES
from tests.cli_checks import assert_usage_error

FAMILIES = ("t5", "bart", "marian", "whisper")
MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
NEW = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf2")
    return {k: tiny_folder(k, root / f"tiny-{k}") for k in FAMILIES}


def _opened(folder, task=None):
    from mtconvert.generation import folder as folder_mod

    return folder_mod.open_folder(folder, task, False)


def _encoder_input(kind, hf):
    from mtconvert.generation import encdec
    from mtconvert.options import ConvertOptions

    opts = ConvertOptions(prompt_ids=(5, 17, 42, 8, 9) if kind != "whisper" else None)
    return encdec.encoder_input(hf, opts)


@pytest.mark.parametrize("kind", FAMILIES)
def test_two_graphs_match_the_original_model(kind, folders):
    """Encoder module → cross K/V → step module with its explicit cache, teacher-forced: every
    step's logits equal the Hugging Face model's full forward within the fp32 profile; free
    running, the same greedy tokens; a trained-like init (not one repeated token)."""
    from mtconvert.generation import encdec, folder as folder_mod, seq2seq
    from mtconvert.generation.loop import decode

    hf = _opened(folders[kind])
    task = "automatic-speech-recognition" if kind == "whisper" else "text2text-generation"
    assert hf.task == task
    model = folder_mod.load_model(hf)
    feeds, shown, _ = _encoder_input(kind, hf)
    ref = encdec.reference_decode(model, hf, feeds, 6)
    enc, module, geo = seq2seq.build(model, 16, feeds["input_ids"].shape[1]
                                     if "input_ids" in feeds else 0)
    cross = encdec.cross_kv(enc, feeds)
    run = encdec._runner(module)
    forced = decode(run, geo, ref.prompt, len(ref.tokens), forced=ref.tokens, extra=cross)
    free = decode(run, geo, ref.prompt, len(ref.tokens), extra=cross)
    section, reasons = judge_mod.judge(ref, forced.logits, free.tokens, free.step_ms,
                                       PROFILES["fp32"], geo.cache_bytes(), 16, None)
    assert reasons == [], reasons
    assert free.tokens == list(ref.tokens) and len(set(ref.tokens)) > 2
    assert ref.prompt == (model.config.decoder_start_token_id,)
    assert (shown is None) == (kind == "whisper")


def test_speech_features_are_generated_seeded_when_not_given(folders):
    from mtconvert.generation import encdec
    from mtconvert.options import ConvertOptions

    hf = _opened(folders["whisper"])
    a, shown, how = encdec.encoder_input(hf, ConvertOptions(seed=7))
    b, _, _ = encdec.encoder_input(hf, ConvertOptions(seed=7))
    assert a["input_features"].shape == (1, 16, 32) and a["input_features"].dtype == np.float32
    assert np.array_equal(a["input_features"], b["input_features"]) and shown is None
    assert how.startswith("generated log-mel features: standard normal, seed 7, shape [1, 16, 32]")


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_encoder_input_steers_the_decode(kind, folders):
    """Another encoder input, another greedy decode (the fixtures' cross-attention is not
    uniform); the step fed the other input's cross K/V fails the judgement."""
    from mtconvert.generation import encdec, folder as folder_mod, seq2seq
    from mtconvert.generation.loop import decode

    hf = _opened(folders[kind])
    model = folder_mod.load_model(hf)
    if kind == "whisper":
        a, b = ({"input_features": np.random.default_rng(s).standard_normal((1, 16, 32))
                 .astype(np.float32)} for s in (0, 3))
    else:
        a, b = ({"input_ids": np.array([p], np.int64)} for p in ([5, 17, 42, 8, 9],
                                                                 [100, 200, 7, 250, 33]))
    ref = encdec.reference_decode(model, hf, a, 6)
    assert encdec.reference_decode(model, hf, b, 6).tokens != ref.tokens
    enc, module, geo = seq2seq.build(model, 16, 5)
    other = encdec.cross_kv(enc, b)
    got = decode(encdec._runner(module), geo, ref.prompt, 6, forced=ref.tokens, extra=other)
    section, reasons = judge_mod.judge(ref, got.logits, got.tokens, got.step_ms,
                                       PROFILES["fp32"], geo.cache_bytes(), 16, None)
    assert not section["teacher_forced"]["passed"]
    assert any(r.startswith("teacher-forced logits") for r in reasons)


def _cli(*args):
    return subprocess.run([MTCONVERT, *map(str, args)], capture_output=True, text=True,
                          timeout=900)


@pytest.mark.parametrize("kind,args,needle", [
    ("t5", ["--task", "automatic-speech-recognition"],
     "cannot do --task automatic-speech-recognition"),
    ("whisper", ["--prompt-ids", "1,2"], "log-mel features"),
])
def test_bad_input_exits_2_with_one_line(kind, args, needle, tmp_path, folders):
    out = tmp_path / "out"
    proc = _cli(folders[kind], "--to", "onnx-mobile", "--out", out, *args)
    assert_usage_error(proc, needle, out)


@pytest.mark.parametrize("case,needle", [
    ("t5-as-causal", "cannot do --task text-generation"),
    ("whisper-bad-features", "the model takes [1, 16, 32]"),
    ("whisper-features-no-name", "no array named input_features"),
    ("t5-no-start", "no decoder_start_token_id"),
    ("marian-too-long", "longer than the encoder's 64 positions"),
])
def test_bad_input_is_refused_before_anything_is_written(case, needle, tmp_path, folders):
    import mtconvert
    from mtconvert.errors import UsageError

    kw = {}
    folder = folders[case.split("-")[0]]
    if case == "t5-as-causal":
        kw["task"] = "text-generation"
    elif case.startswith("whisper"):
        feats = {"input_features": np.zeros((1, 16, 30), np.float32)} if "bad" in case else \
            {"a": np.zeros((1, 16, 32), np.float32), "b": np.zeros(1, np.float32)}
        np.savez(tmp_path / "feats.npz", **feats)
        kw["inputs"] = tmp_path / "feats.npz"
    elif case == "t5-no-start":
        folder = tmp_path / "t5"
        shutil.copytree(folders["t5"], folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("decoder_start_token_id")
        (folder / "config.json").write_text(json.dumps(cfg))
    else:
        kw["prompt_ids"] = ",".join(["5"] * 65)
    with pytest.raises(UsageError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        mtconvert.convert(folder, "onnx-mobile", tmp_path / "out", None, max_new_tokens=4,
                          **kw)
    assert not (tmp_path / "out").exists()


# every target covered by at least one family, each family by at least one target, so that the
# module's conversions stay few (the whole family x target matrix: benchmarks/bench_generation.py
# --seq2seq); T5's relative-position tables on the PyTorch-based targets, Whisper's convolutions
# on the onnx2tf and pnnx ones
TARGETS = {"t5": ("onnx-mobile", "coreml", "executorch"), "whisper": ("tflite", "ncnn"),
           "bart": ("onnx-mobile",), "marian": ("onnx-mobile",)}


def _targets(kind):
    from mtconvert.registry import default_registry

    reg = default_registry()
    return [n for n in TARGETS[kind] if reg.get(n).availability().can_convert]


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    """``get(kind)``: one conversion of that family to its targets that can run here, made by
    the first test that asks (so a run of the suite without the sweep converts only the
    families it checks; no conversion cache, so the time is a cold run's): (report JSON, out)."""
    import mtconvert

    done = {}

    def get(kind):
        if kind not in done:
            d = tmp_path_factory.mktemp(f"run-{kind}")
            kw = {"prompt_ids": "5,17,42,8,9"}
            if kind == "whisper":  # the user's log-mel features (generated ones: a test above)
                feats = np.random.default_rng(3).standard_normal((1, 16, 32)).astype(np.float32)
                np.savez(d / "mel.npz", input_features=feats)
                kw = {"inputs": d / "mel.npz"}
            report = mtconvert.convert(folders[kind], _targets(kind), d / "out", None,
                                       max_new_tokens=NEW, iterations=2, warmup=0, jobs=1,
                                       cache=False, **kw)
            done[kind] = (json.loads(report.to_json()), d / "out")
        return done[kind]
    return get


# T5 (three targets: onnx-mobile, coreml, executorch) in every run of the suite; the other
# families are the sweep (`make test-all`; pytest -m sweep)
@pytest.mark.slow
@pytest.mark.parametrize("kind", [k if k == "t5" else pytest.param(k, marks=pytest.mark.sweep)
                                  for k in FAMILIES])
def test_every_target_generates_the_reference_tokens(kind, runs):
    """Each target converts both graphs; its encoder artifact then its step artifact,
    stepped with its own KV cache, generate the reference's greedy tokens (a near-tie may
    differ, and is reported so)."""
    if not _targets(kind):
        pytest.skip(f"none of {TARGETS[kind]} can convert here")
    report, out = runs(kind)
    settings = report["settings"]["generation"]
    assert settings["graphs"] == ["decoder_with_past", "encoder"]
    assert settings["step_module_max_abs_error"] <= 1e-4
    if kind == "whisper":
        assert settings["prompt"] == "--inputs mel.npz (input_features [1, 16, 32])"
    bad = {t["name"]: t["reason"] for t in report["targets"] if t["status"] != "passed"}
    assert not bad, bad
    assert [t["name"] for t in report["targets"]] == _targets(kind)
    for t in report["targets"]:
        gen = t["generation"]
        assert "skipped" not in gen, gen
        assert gen["steps"] == NEW
        assert gen["decoder_start_tokens"] == [settings["decoder_start_token_id"]]
        first = gen["first_mismatch_step"]
        agreed = gen["target_tokens"] if first is None else gen["target_tokens"][:first]
        assert agreed == gen["reference_tokens"][:len(agreed)]
        assert first is None or gen["first_mismatch_is_tie"]
        assert gen["prompt_tokens"] == (None if kind == "whisper" else [5, 17, 42, 8, 9])
        assert gen["graphs"]["encoder"]["status"] == "passed"
        assert gen["graphs"]["encoder"]["numerics_passed"] is True
        if "time_to_first_token_ms" in gen:  # coreml off macOS: latency_unavailable says why
            assert gen["encoder_ms"] > 0 and gen["time_to_first_token_ms"] > gen["encoder_ms"]
        else:
            assert gen["latency_unavailable"] and "encoder_ms" not in gen
        roles = {Path(a["path"]).name: a["role"] for a in t["artifacts"]}
        assert any(n.startswith(f"tiny-{kind}-encoder") and r == "encoder"
                   for n, r in roles.items()), roles
        assert any(n.startswith(f"tiny-{kind}-step") and r == "artifact"
                   for n, r in roles.items()), roles


def test_console_shows_each_graph_and_the_encoder_in_the_first_token():
    """A speech model's generation (no prompt tokens): time to first token is the encoder's
    run plus the first step, one line per graph, a failing encoder graph's reason shown."""
    import io

    from mtconvert.render import console
    from mtconvert.report import Report, SourceInfo, TargetMap, TargetReport

    gen = {"steps": 2, "tokens_agree": 1.0, "first_mismatch_step": None, "ties": 0,
           "first_mismatch_is_tie": None, "prompt_tokens": None, "decoder_start_tokens": [1],
           "reference_tokens": [7, 8], "target_tokens": [7, 8], "step_max_abs_error": [0, 0],
           "teacher_forced": {"passed": True, "max_abs": 1e-6}, "kv_cache_bytes": 4096,
           "max_cache": 16, "time_to_first_token_ms": 1.5, "encoder_ms": 1.25,
           "decode_ms_p50": 0.5, "decode_ms_p90": 0.7, "passed": True,
           "graphs": {"encoder": {"status": "failed", "reason": "cross_key_0 off",
                                  "worst": {"max_abs": 0.25}},
                      "decoder_with_past": {"status": "passed", "reason": None,
                                            "worst": {"max_abs": 1e-6}}}}
    t = TargetReport("tflite", "failed", "encoder graph: cross_key_0 off", generation=gen)
    report = Report(SourceInfo("m", "hf-folder", None, (), ()), None, TargetMap([t]))
    out = io.StringIO()
    console.render(report, out)
    text = " ".join(out.getvalue().split())
    assert "time to first token 1.50 ms (encoder 1.25 ms + first decoder step)" in text
    assert "graph encoder: failed, max abs 2.50e-01: cross_key_0 off" in text
    assert "graph decoder_with_past: passed, max abs 1.00e-06" in text


def test_a_failing_encoder_graph_is_the_targets_failure_never_hidden():
    from mtconvert.generation.encdec import merged
    from mtconvert.report import ArtifactFile, TargetReport

    step = TargetReport("ncnn", "passed", artifacts=(ArtifactFile("/o/m-step.param", 1),))
    enc = TargetReport("ncnn", "failed", "cross_key_0: max abs 0.3",
                       artifacts=(ArtifactFile("/o/m-encoder.param", 1),
                                  ArtifactFile("/o/m-encoder.bin", 1, "sidecar")))
    out = merged(step, enc)
    assert out.status == "failed" and out.reason == "encoder graph: cross_key_0: max abs 0.3"
    assert [(a.path, a.role) for a in out.artifacts] == [
        ("/o/m-step.param", "artifact"), ("/o/m-encoder.param", "encoder"),
        ("/o/m-encoder.bin", "sidecar")]
    crashed = merged(step, TargetReport("ncnn", "error", "pnnx crashed"))
    assert crashed.status == "error" and "encoder graph: pnnx crashed" in crashed.reason
    assert merged(step, TargetReport("ncnn", "passed")).status == "passed"


@pytest.mark.slow
def test_golden_bundle_carries_both_graphs_and_the_generation_to_verify(tmp_path, folders):
    """--bundle of an encoder-decoder: the step graph's bundle carries the encoder graph's own
    bundle, the encoder input, the decoder start and the reference tokens; verify runs the
    encoder artifact then steps the step artifact, without the source. A changed reference
    token is refused (hash), and judged a failed generation once its hash is rewritten."""
    import mtconvert
    from mtconvert.errors import ModelLoadError
    from mtconvert.source import sha256_of

    bundles = tmp_path / "bundles"
    made = mtconvert.convert(folders["t5"], "onnx-mobile", tmp_path / "out", None,
                             prompt_ids="5,17,42,8,9", max_new_tokens=6, iterations=2,
                             warmup=0, cache=False, bundle=bundles)
    made_gen = made.targets["onnx-mobile"].generation
    assert made.targets["onnx-mobile"].status == "passed", made.targets["onnx-mobile"].reason
    assert sorted(p.name for p in bundles.iterdir()) == ["onnx-mobile"]
    here = bundles / "onnx-mobile"
    manifest = json.loads((here / "generation.json").read_text())
    assert manifest["encoder"]["prompt_tokens"] == [5, 17, 42, 8, 9]
    assert json.loads((here / "encoder" / "bundle.json").read_text())["source"]["name"] == \
        "tiny-t5-encoder"
    assert json.loads((here / "bundle.json").read_text())["source"]["name"] == "tiny-t5-step"

    checked = mtconvert.verify(bundles, iterations=2, warmup=0)
    t = checked.targets["onnx-mobile"]
    assert t.status == "passed", t.reason
    assert t.generation["passed"] and t.generation["prompt_tokens"] == [5, 17, 42, 8, 9]
    assert t.generation["decoder_start_tokens"] == made_gen["decoder_start_tokens"]
    assert t.generation["target_tokens"] == made_gen["reference_tokens"]
    assert t.generation["reference_tokens"] == made_gen["reference_tokens"]
    assert [Path(a.path).name for a in t.artifacts if a.role == "encoder"] == \
        ["tiny-t5-encoder.ort"]

    arrays = here / "generation.npz"
    with np.load(arrays) as data:
        changed = {k: data[k] for k in data.files}
    vocab = changed["reference_logits"].shape[-1]
    changed["reference_tokens"][0] = (changed["reference_tokens"][0] + 1) % vocab
    np.savez(arrays, **changed)
    with pytest.raises(ModelLoadError, match="was changed"):
        mtconvert.verify(bundles, iterations=2, warmup=0)
    manifest["arrays_sha256"] = sha256_of(arrays)
    (here / "generation.json").write_text(json.dumps(manifest))
    tampered = mtconvert.verify(bundles, iterations=2, warmup=0).targets["onnx-mobile"]
    assert tampered.status == "failed" and not tampered.generation["passed"], tampered.reason
    assert tampered.generation["first_mismatch_step"] == 0
