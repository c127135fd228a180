"""The shape of the code: one skeleton, no import cycles, backends that import only the
contract, typed plugin fields the cache keeps whole, one option spec, renderers as a registry."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mtconvert
from mtconvert import optspec, render
from mtconvert.backends.base import Artifact
from mtconvert.cache import ConversionCache, code_modules
from mtconvert.errors import UsageError
from mtconvert.validators import gates
from mtconvert.validators.compare import PROFILES

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"converter": "mtconvert", "backends": "mtconvert.backends",
            "validators": "mtconvert.validators"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = [pkg, *f.relative_to(ROOT / folder).with_suffix("").parts]
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Every mtconvert module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                      else node.module for a in node.names}
    return {m for m in found if m.startswith("mtconvert")}


def test_no_import_cycle_lazy_imports_included():
    mods = _modules()
    graph = {m: _imports(f, mods) & set(mods) - {m} for m, f in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d):] + [d]
                                                                    if d in path else [m, d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_backends_import_only_the_contract_errors_and_deps():
    mods = _modules()
    allowed = ("mtconvert.backends", "mtconvert.errors", "mtconvert.deps")
    bad = {str(f.relative_to(ROOT)): sorted(m for m in _imports(f, mods)
                                            if ".".join(m.split(".")[:2]) not in allowed)
           for m, f in mods.items() if m.split(".")[:2] == ["mtconvert", "backends"]}
    assert {k: v for k, v in bad.items() if v} == {}


def test_cache_keeps_every_file_of_the_fp32_twin(tmp_path):
    staging, work = tmp_path / "staging", tmp_path / "work"
    twin_dir = tmp_path / "twin-src"
    for d in (staging, twin_dir):
        d.mkdir()
    (staging / "m.fp16.param").write_text("p16")
    (twin_dir / "m.param").write_text("p32")
    (twin_dir / "m.bin").write_bytes(b"weights")
    twin = Artifact("ncnn", twin_dir / "m.param", (twin_dir / "m.param", twin_dir / "m.bin"),
                    meta={"mode": "exact"})
    art = Artifact("ncnn", staging / "m.fp16.param", (staging / "m.fp16.param",),
                   precision="fp16", fp32_twin=twin, tolerance_profile="fp16",
                   input_shapes={"x": (1, 8)})
    cache = ConversionCache(tmp_path / "cache")
    cache.store("k", art, staging, 1.5)
    restored, seconds = cache.load("k", tmp_path / "again", work)
    assert seconds == 1.5 and restored.input_shapes == {"x": (1, 8)}
    assert restored.fp32_twin.meta == {"mode": "exact"}
    assert [p.read_bytes() for p in restored.fp32_twin.files] == [b"p32", b"weights"]
    assert all(p.parent == work for p in restored.fp32_twin.files)


def test_code_hash_covers_the_shared_helpers_a_backend_runs():
    from mtconvert.backends.coreml.backend import CoremlBackend
    from mtconvert.backends.ncnn import NcnnBackend

    coreml = code_modules(CoremlBackend)
    assert {"mtconvert.backends.process", "mtconvert.backends.base",
            "mtconvert.backends.onnx_tools", "mtconvert.backends.coreml.convert"} <= set(coreml)
    # reached only through a function-level import in onnx_tools
    assert "mtconvert.backends.ncnn_rewrite" in code_modules(NcnnBackend)


def test_artifact_round_trips_its_typed_fields():
    twin = Artifact("t", Path("/a/x.param"), (Path("/a/x.param"), Path("/a/x.bin")))
    art = Artifact("t", Path("/b/y"), (Path("/b/y"),), "fp16", fp32_twin=twin,
                   tolerance_profile="int8", input_shapes={"ids": (1, 16)})
    back = Artifact.from_dict(json.loads(json.dumps(art.to_dict())))
    assert back == art and back.profile == "int8" and Artifact("t", Path("y"), ()).profile == "fp32"


def test_option_spec_builds_the_api_and_checks_values():
    from mtconvert.registry import default_registry

    opts = optspec.build("convert", {"targets": "tflite, ncnn", "coreml_target": "iOS17",
                                     "palettize": "4", "atol": {"logits": 1e-3},
                                     "input_shapes": {"input_ids": "1x16"}, "timeout": 5},
                         default_registry())
    assert opts.targets == ("tflite", "ncnn") and opts.timeout_s == 5.0
    assert opts.extra == {"coreml_target": "iOS17", "palettize": 4}
    assert opts.input_shapes == {"input_ids": (1, 16)}
    assert opts.tolerances.resolve("fp32", "logits").atol == 1e-3
    assert opts.tolerances.resolve("fp32", "other").atol == PROFILES["fp32"].atol
    with pytest.raises(UsageError, match="--coreml-target must be one of"):
        optspec.build("convert", {"coreml_target": "iOS9"})
    with pytest.raises(TypeError, match="unexpected option"):
        optspec.build("verify", {"precision": "fp16"})  # verify takes the bundle's precision
    assert optspec.build("convert", {}, extra={"bundle": "gold"}).bundle == Path("gold")


def test_cli_shows_backend_options_without_importing_their_tools():
    code = ("import sys, json\nfrom mtconvert.cli import main\n"
            "try:\n    main(['convert', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps([m for m in ('torch', 'tensorflow', 'coremltools', 'ncnn', "
            "'onnx', 'numpy') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "--coreml-target" in proc.stdout and "--keep-intermediate" in proc.stdout
    assert "--report-json" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_renderers_are_a_registry(tmp_path, tiny_onnx, fake_registry):
    assert {"console", "json"} <= set(render.RENDERERS)
    report = mtconvert.convert(tiny_onnx, targets=["fake"], out_dir=tmp_path / "o",
                               registry=fake_registry, iterations=1, warmup=0)
    render.write_files(report, {"report_json": tmp_path / "r.json"})
    assert mtconvert.Report.from_json((tmp_path / "r.json").read_text()) == report


def test_gates_are_pure_functions():
    ref = {"y": np.ones(4, np.float32)}
    tol = lambda _name: PROFILES["fp32"]  # noqa: E731
    good = gates.judge(ref, {"y": ref["y"] + 1e-7}, tol)
    bad = gates.judge(ref, {"y": ref["y"] + 0.1}, tol)
    assert good.passed and not bad.passed and bad.worst["output"] == "y"
    assert gates.numerics_reason(bad.outputs).startswith("numerics: y: ")
    assert gates.verdict([]) == ("passed", None)
    assert gates.verdict(["a", "b"]) == ("failed", "a; b")
    assert gates.nonfinite({"y": np.array([np.inf], np.float32)})
