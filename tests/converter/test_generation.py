"""Generative models from a Hugging Face folder (mtconvert.generation): the decode-step module
against the original model, the host loop and its judgement, bad input, and each target end to
end through the CLI or the API, judged by the tokens it generates."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtconvert.generation import judge as judge_mod
from mtconvert.generation.fixtures import tiny_folder
from mtconvert.validators.tolerances import PROFILES
from tests.cli_checks import assert_usage_error

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: tiny_folder(k, root / f"tiny-{k}") for k in ("gpt2", "llama", "qwen2", "mistral")}


def _cli(*args, cwd=None):
    return subprocess.run([MTCONVERT, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


def _load(folder):
    from mtconvert.generation import folder as folder_mod

    return folder_mod.load_model(folder_mod.open_folder(folder, None, False))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "mistral"])
def test_step_module_matches_the_original_model(kind, folders):
    """Teacher-forced through the step module with its explicit cache, every position's logits
    equal the Hugging Face model's full forward within the fp32 profile."""
    from mtconvert.generation import reference, step

    model = _load(folders[kind])
    ref = reference.greedy(model, (5, 17, 42), 6)
    module, geo = step.build(model, 16)
    from mtconvert.generation.loop import decode
    import torch

    def run(feeds):
        with torch.inference_mode():
            return {k: v.numpy() for k, v in module(*map(torch.from_numpy, feeds.values())).items()}

    got = decode(run, geo, ref.prompt, len(ref.tokens), forced=ref.tokens)
    section, reasons = judge_mod.judge(ref, got.logits, got.tokens, got.step_ms,
                                       PROFILES["fp32"], geo.cache_bytes(), 16, None)
    assert reasons == [], reasons
    assert got.tokens == list(ref.tokens)
    assert len(set(ref.tokens)) > 2  # a trained-like init: greedy does not just repeat a token
    assert section["kv_cache_bytes"] == 2 * geo.layers * geo.kv_heads * 16 * geo.head_dim * 4


def test_a_cache_the_loop_does_not_keep_fails(folders):
    """The same module with its past zeroed each step: the judgement must catch it."""
    from mtconvert.generation import reference, step
    from mtconvert.generation.loop import decode
    import torch

    model = _load(folders["llama"])
    ref = reference.greedy(model, (5, 17, 42), 6)
    module, geo = step.build(model, 16)

    def forgetful(feeds):
        feeds = {k: (np.zeros_like(v) if k.startswith("past_") else v) for k, v in feeds.items()}
        with torch.inference_mode():
            return {k: v.numpy() for k, v in module(*map(torch.from_numpy, feeds.values())).items()}

    got = decode(forgetful, geo, ref.prompt, len(ref.tokens))
    section, reasons = judge_mod.judge(ref, got.logits, got.tokens, got.step_ms,
                                       PROFILES["fp32"], geo.cache_bytes(), 16, None)
    assert not section["passed"] and not section["teacher_forced"]["passed"]
    assert any(r.startswith("teacher-forced logits") for r in reasons)


def test_nan_logits_fail_the_generation_and_the_section_is_valid_json():
    """A target whose logits are NaN (ncnn's one-row Gemm before it was fixed) is a failed
    generation, never an internal error when the report is written."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    ref = SimpleNamespace(prompt=(5, 17), tokens=[3, 4, 5],
                          logits=rng.standard_normal((4, 10)).astype(np.float32))
    bad = np.full_like(ref.logits, np.nan)
    section, reasons = judge_mod.judge(ref, bad, [0, 0, 0], [1.0] * 4, PROFILES["fp32"],
                                       1024, 16, None)
    assert not section["passed"] and reasons
    assert section["step_max_abs_error"] == [None, None, None]
    assert section["prefill_max_abs_error"] is None
    json.dumps(section, allow_nan=False)  # what Report.to_json does


def test_near_tie_is_judged_by_the_tolerance():
    tol = PROFILES["fp32"]  # atol 1e-4, rtol 1e-4
    assert judge_mod.near_tie(np.array([0.0, 1.0, 1.0 + 1e-5], np.float32), tol, 0.0)
    assert not judge_mod.near_tie(np.array([0.0, 1.0, 1.5], np.float32), tol, 0.0)
    int8 = PROFILES["int8"]  # no absolute bound: twice the target's own error
    assert judge_mod.near_tie(np.array([0.0, 1.0, 1.1]), int8, 0.06)
    assert not judge_mod.near_tie(np.array([0.0, 1.0, 1.1]), int8, 0.04)


def _folder_variants(tmp: Path, folders) -> dict[str, Path]:
    src = folders["gpt2"]
    out = {}
    for name in ("noconfig", "noweights", "pickled", "bert", "nogpt"):
        d = tmp / name
        d.mkdir()
        out[name] = d
    (out["noweights"] / "config.json").write_text((src / "config.json").read_text())
    (out["pickled"] / "config.json").write_text((src / "config.json").read_text())
    (out["pickled"] / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (out["noconfig"] / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    for name, arch, kind in (("bert", "BertForMaskedLM", "bert"),
                             ("nogpt", "FalconForCausalLM", "falcon")):
        (out[name] / "config.json").write_text(json.dumps(cfg | {"architectures": [arch],
                                                                  "model_type": kind}))
        (out[name] / "model.safetensors").write_bytes(b"x")
    return out


@pytest.mark.parametrize("case,args,needle", [
    ("noconfig", [], "without config.json"),
    ("noweights", [], "has no weights"),
    ("pickled", [], "is a pickle"),
    ("bert", ["--task", "text-generation"], "cannot do --task text-generation"),
    ("bert", [], "--task fill-mask: not supported"),
    ("nogpt", [], "architecture 'falcon'"),
    ("gpt2", ["--prompt-ids", ",".join(["1"] * 20), "--max-cache", "16"], "longer than"),
    ("gpt2", ["--prompt-ids", "1,2", "--max-cache", "8", "--max-new-tokens", "9"],
     "give at least 10"),
    ("gpt2", ["--prompt", "hello"], "no tokenizer.json"),
    ("gpt2", ["--prompt-ids", "1,99999"], "outside the vocabulary"),
    ("gpt2", ["--task", "text2text-generation"], "cannot do --task text2text-generation"),
    ("gpt2", ["--seq-lens", "8,16"], "--seq-lens: not available"),
    ("gpt2", ["--precision", "int8"], "int8 is not available for generation"),
])
def test_bad_input_exits_2_with_one_line(case, args, needle, tmp_path, folders):
    variants = _folder_variants(tmp_path, folders)
    folder = folders["gpt2"] if case == "gpt2" else variants[case]
    out = tmp_path / "out"
    proc = _cli(folder, "--to", "onnx-mobile", "--out", out, *args)
    assert_usage_error(proc, needle, out)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_onnx_mobile_generates_the_reference_tokens_via_the_cli(kind, tmp_path, folders):
    report_path = tmp_path / "report.json"
    proc = _cli(folders[kind], "--to", "onnx-mobile", "--prompt-ids", "1,2,3",
                "--max-new-tokens", "12", "--out", tmp_path / "out", "--report-json",
                report_path, "-q", "--iterations", "3", "--warmup", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["source"]["format"] == "hf-folder"
    settings = report["settings"]["generation"]
    assert settings["task"] == "text-generation" and settings["max_cache"] == 16
    target = report["targets"][0]
    gen = target["generation"]
    assert target["status"] == "passed" and gen["passed"]
    assert gen["prompt_tokens"] == [1, 2, 3] and gen["steps"] == 12
    assert gen["target_tokens"] == gen["reference_tokens"] and gen["tokens_agree"] == 1.0
    assert gen["first_mismatch_step"] is None and len(gen["step_max_abs_error"]) == 12
    assert max(gen["step_max_abs_error"]) <= 1e-4
    assert gen["time_to_first_token_ms"] > 0 and gen["decode_samples"] == 11
    assert gen["decode_ms_p90"] >= gen["decode_ms_p50"] > 0
    assert (tmp_path / "out" / f"tiny-{kind}-step.ort").is_file()


def test_prompt_text_goes_through_the_folders_tokenizer(tmp_path, folders):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from mtconvert.generation import folder as folder_mod, reference

    d = tmp_path / "with-tokenizer"
    shutil.copytree(folders["gpt2"], d)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 5, "world": 17}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    hf = folder_mod.open_folder(d, None, False)
    ids, how = reference.prompt_ids(hf, "hello world again", None, 300)
    assert ids == (5, 17, 0) and "tokenized by tokenizer.json" in how
    with pytest.raises(Exception, match="not both"):
        reference.prompt_ids(hf, "hello", (1, 2), 300)


def test_an_in_memory_model_generates_like_its_folder(tmp_path, folders):
    """A PreTrainedModel given to the API without example inputs: the same generation path."""
    import mtconvert

    model = _load(folders["llama"])
    report = mtconvert.convert(model, "onnx-mobile", tmp_path / "out", None,
                               prompt_ids="5,17,42", max_new_tokens=6, iterations=2, warmup=0)
    t = report.targets["onnx-mobile"]
    assert report.source.format == "hf-model" and report.source.path is None
    assert t.status == "passed" and t.generation["target_tokens"] == \
        t.generation["reference_tokens"]
    assert (tmp_path / "out" / "llamaforcausallm-step.ort").is_file()


def test_golden_bundle_carries_the_generation_to_verify(tmp_path, folders):
    """--bundle keeps prompt, reference tokens and logits beside the step graph; verify steps
    the bundled artifact through the generation again, without the source; a changed
    reference is refused."""
    import mtconvert
    from mtconvert.errors import ModelLoadError

    bundles = tmp_path / "bundles"
    made = mtconvert.convert(folders["gpt2"], "onnx-mobile", tmp_path / "out", None,
                             prompt_ids="5,17,42", max_new_tokens=6, iterations=2, warmup=0,
                             bundle=bundles)
    assert made.targets["onnx-mobile"].status == "passed"
    assert (bundles / "onnx-mobile" / "generation.json").is_file()
    checked = mtconvert.verify(bundles, iterations=2, warmup=0)
    gen = checked.targets["onnx-mobile"].generation
    assert checked.targets["onnx-mobile"].status == "passed" and gen["passed"]
    assert gen["target_tokens"] == made.targets["onnx-mobile"].generation["reference_tokens"]
    arrays = bundles / "onnx-mobile" / "generation.npz"
    with np.load(arrays) as data:
        changed = {k: data[k] for k in data.files}
    changed["reference_tokens"] = changed["reference_tokens"][::-1].copy()
    np.savez(arrays, **changed)
    with pytest.raises(ModelLoadError, match="was changed"):
        mtconvert.verify(bundles, iterations=2, warmup=0)


def test_default_prompt_is_said_in_the_report(tmp_path, folders):
    import mtconvert

    report = mtconvert.convert(folders["gpt2"], "onnx-mobile", tmp_path / "out", None,
                               max_new_tokens=4, iterations=2, warmup=0)
    assert report.settings["generation"]["prompt"].startswith("default prompt")
    gen = report.targets["onnx-mobile"].generation
    assert gen["prompt_tokens"] == [1, 2, 3, 4, 5, 6, 7, 8] and gen["steps"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("target,precision", [("tflite", "fp32"), ("ncnn", "fp32"),
                                              ("coreml", "fp32"), ("executorch", "fp32"),
                                              ("tflite", "fp16")])
def test_target_generates_the_reference_tokens(target, precision, tmp_path, folders):
    """Every target through the same step graph: the artifact, stepped with its own KV cache,
    generates the reference's greedy tokens (a near-tie may differ, and is reported so)."""
    import mtconvert
    from mtconvert.registry import default_registry

    if not default_registry().get(target).availability().can_convert:
        pytest.skip(f"{target} is not installed here")
    report = mtconvert.convert(folders["llama"], target, tmp_path / "out", None,
                               prompt_ids="1,2,3", max_new_tokens=8, iterations=2, warmup=0,
                               jobs=1, precision=precision)
    t = report.targets[target]
    assert t.status == "passed", t.reason
    gen = t.generation
    assert gen["teacher_forced"]["tolerance"]["atol"] == PROFILES[precision].atol
    assert "skipped" not in gen, gen
    first = gen["first_mismatch_step"]
    agreed = gen["target_tokens"] if first is None else gen["target_tokens"][:first]
    assert agreed == gen["reference_tokens"][:len(agreed)]
    assert first is None or gen["first_mismatch_is_tie"]


def test_reports_show_the_generation():
    """Console and Markdown show the tokens side by side where they differ; JSON keeps the
    section through a round trip."""
    import io

    from mtconvert.render import console, markdown
    from mtconvert.report import Report, SourceInfo, TargetMap, TargetReport

    gen = {"steps": 4, "tokens_agree": 0.5, "first_mismatch_step": 2, "ties": 0,
           "first_mismatch_is_tie": False, "prompt_tokens": [1, 2], "reference_tokens": [7, 8, 9, 10],
           "target_tokens": [7, 8, 11, 12], "step_max_abs_error": [0.0, 0.0, 0.5, 0.6],
           "teacher_forced": {"passed": False, "max_abs": 0.6}, "kv_cache_bytes": 4096,
           "max_cache": 16, "time_to_first_token_ms": 1.0, "decode_ms_p50": 0.5,
           "decode_ms_p90": 0.7, "passed": False}
    t = TargetReport("tflite", "failed", "greedy decode: step 2 gave token 11, the reference 9",
                     generation=gen)
    report = Report(SourceInfo("m", "hf-folder", None, (), ()), None, TargetMap([t]))
    assert Report.from_json(report.to_json()).targets["tflite"].generation == gen
    out = io.StringIO()
    console.render(report, out)
    text = out.getvalue()
    assert "50% of 4 greedy tokens agree, first mismatch at step 2" in text
    assert [line.split() for line in text.splitlines() if line.split()[:1] in (["2"], ["3"])] \
        == [["2", "9", "11"], ["3", "10", "12"]]
    md = markdown.to_markdown(report)
    assert "| 2/4 | 0.50 |" in md and "step 2: reference token 9, target 11" in md
    from junitparser import Failure, JUnitXml

    from mtconvert.render import html, junit

    page = html.to_html(report)
    assert "<h3>Generation</h3>" in page and "<td>2</td><td>9</td><td>11</td>" in page
    assert "50% of 4 greedy tokens agree, first mismatch at step 2" in page
    xml = io.BytesIO()
    junit.render(report, xml)
    cases = {c.name: c for suite in JUnitXml.fromstring(xml.getvalue().decode())
             for c in suite}
    failure = cases["generation"].result[0]
    assert isinstance(failure, Failure) and "step 2: reference 9, target 11" in failure.message


def test_a_pickled_folder_loads_only_when_trusted(tmp_path, folders):
    import shutil

    import torch

    import mtconvert
    from mtconvert.errors import ModelLoadError

    d = tmp_path / "pickled"
    shutil.copytree(folders["gpt2"], d)
    (d / "model.safetensors").unlink()
    torch.save(_load(folders["gpt2"]).state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="is a pickle"):
        mtconvert.convert(d, "onnx-mobile", tmp_path / "out", None, prompt_ids="1,2,3")
    report = mtconvert.convert(d, "onnx-mobile", tmp_path / "out", None, prompt_ids="1,2,3",
                               max_new_tokens=4, trust_pickle=True, iterations=2, warmup=0)
    gen = report.targets["onnx-mobile"].generation
    assert gen["passed"] and gen["target_tokens"] == gen["reference_tokens"]


def test_a_target_whose_logits_have_another_shape_fails_without_crashing(monkeypatch, folders):
    """A runtime answering with the wrong vocabulary size: the target fails with the reason,
    the run goes on (no exception out of the judgement)."""
    from mtconvert.generation import reference, step, target
    from mtconvert.report import TargetReport

    model = _load(folders["gpt2"])
    ref = reference.greedy(model, (1, 2), 3)
    _, geo = step.build(model, 16)
    wrong = {"forced_logits": np.zeros((4, 7), np.float32), "free_tokens": [0, 0, 0],
             "step_ms": [1.0] * 4, "runtime": "x", "latency_unavailable": None}
    monkeypatch.setattr(target, "run_loop", lambda *a: wrong)
    out = target.generated(None, None, None, TargetReport("t", "passed"), ref, geo,
                           PROFILES["fp32"])
    assert out.status == "failed" and "logits per step (4, 7)" in out.reason
