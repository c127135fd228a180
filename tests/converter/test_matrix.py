"""``mtconvert matrix``: the matrix file, the local process pool and the Ray executor, cells
whose worker dies or hangs, --resume, Ctrl-C, the MatrixReport and its renderers, and the
conversion cache shared by several processes."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from junitparser import JUnitXml

from mtconvert import matrix_spec
from mtconvert.errors import UsageError
from mtconvert.matrix_report import MatrixReport
from mtconvert.registry import Registry
from mtconvert.render import render
from mtconvert.run import matrix
from tests.fake_backend import FakeBackend
from tests.models import tiny_encoder

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
ROOT = Path(__file__).resolve().parents[2]
QUICK = "[options]\niterations = 1\nwarmup = 0\n"


class KilledBackend(FakeBackend):
    """Its conversion kills the cell's own worker process (as the out-of-memory killer does)."""

    name = "fake-killed"
    aliases = ()

    def convert(self, source, out_dir, opts):  # noqa: ANN001, ANN201
        os.kill(os.getpid(), signal.SIGKILL)


class HungBackend(FakeBackend):
    """Its conversion never ends (in the cell's process, where no step time-out reaches)."""

    name = "fake-hung"
    aliases = ()

    def convert(self, source, out_dir, opts):  # noqa: ANN001, ANN201
        time.sleep(3600)


class SlowBackend(FakeBackend):
    """A conversion that takes a while, and counts itself in a file."""

    name = "fake-slow"
    aliases = ()

    def convert(self, source, out_dir, opts):  # noqa: ANN001, ANN201
        with open(os.environ["SLOW_COUNT"], "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(1.5)
        return super().convert(source, out_dir, opts)


def _registry() -> Registry:
    reg = Registry()
    for cls in (FakeBackend, KilledBackend, HungBackend, SlowBackend):
        reg.register(cls)
    return reg


def _write(tmp: Path, text: str) -> Path:
    for name, seed in (("tiny_a", 0), ("tiny_b", 1)):
        if not (tmp / f"{name}.onnx").exists():
            tiny_encoder(tmp / f"{name}.onnx", seed=seed)
    path = tmp / "zoo.toml"
    path.write_text(textwrap.dedent(text))
    return path


# --- the matrix file -----------------------------------------------------------------------
def test_matrix_file_gives_one_cell_per_model_target_precision(tmp_path):
    path = _write(tmp_path, """
        targets = ["ort"]
        precisions = ["fp32", "int8"]
        [options]
        iterations = 2
        [models.tiny_a]
        path = "tiny_a.onnx"
        task = "text-classification"
        inputs = "data/a.npz"
        input_shapes = { input_ids = "1x16" }
        atol = 1e-3
        [models.tiny_b]
        path = "tiny_b.onnx"
        precisions = ["fp32"]
        iterations = 5
        """)
    spec = matrix_spec.load(path, tmp_path / "out")
    assert [c.id for c in spec.cells] == ["tiny_a/onnx-mobile/fp32", "tiny_a/onnx-mobile/int8",
                                          "tiny_b/onnx-mobile/fp32"]
    a, _, b = spec.cells
    assert a.path == str(tmp_path / "tiny_a.onnx") and a.task == "text-classification"
    assert a.values["inputs"] == str(tmp_path / "data" / "a.npz")  # from the file's folder
    assert a.values["out_dir"] == str(tmp_path / "out" / "tiny_a" / "onnx-mobile-fp32")
    opts = matrix_spec.build_options(b)
    assert opts.targets == ("onnx-mobile",) and opts.iterations == 5 and opts.jobs == 1
    assert matrix_spec.build_options(a).input_shapes == {"input_ids": (1, 16)}


@pytest.mark.parametrize("text,needle", [
    ('[models.m]\npath = "tiny_a.onnx"\ntargets = ["ort"]\nbogus = 1\n', "unknown option 'bogus'"),
    ('[models.m]\npath = "tiny_a.onnx"\ntargets = ["nope"]\n', "unknown target 'nope'"),
    ('targets = ["ort"]\nprecisions = ["fp8"]\n[models.m]\npath = "a.onnx"\n', "precision 'fp8'"),
    ('targets = ["ort"]\n[models.m]\npath = "a.onnx"\ninput_shapes = {x = "1x"}\n', "cell m/"),
    ('targets = ["ort"]\n[models.m]\npath = "a.onnx"\nprecision = "int8"\n', "precisions"),
    ('targets = ["ort"]\n[models.m]\npath = "a.onnx"\nout_dir = "x"\n', "--out"),
    ('targets = ["ort"]\n[models.m]\ntask = "x"\n', "no path"),
    ('[models.m]\npath = "a.onnx"\n', "no targets"),
    ('targets = ["ort"]\n', "no models"),
    ('target = ["ort"]\n[models.m]\npath = "a.onnx"\n', "unknown key(s) target"),
    ('targets = ["ort"\n', "not valid TOML"),
])
def test_matrix_file_errors_are_one_line_usage_errors(tmp_path, text, needle):
    path = tmp_path / "zoo.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        matrix_spec.load(path, tmp_path / "out")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_cli_unknown_key_exits_2_with_one_line(tmp_path):
    path = _write(tmp_path, '[models.m]\npath = "tiny_a.onnx"\ntargets = ["ort"]\nfoo = 1\n')
    proc = subprocess.run([MTCONVERT, "matrix", path, "--out", tmp_path / "out"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip()] and "unknown option 'foo'" in proc.stderr
    assert not (tmp_path / "out").exists()


# --- the local pool, end to end --------------------------------------------------------------
def test_local_matrix_two_models_onnx_mobile_fp32_int8(tmp_path):
    path = _write(tmp_path, """
        targets = ["onnx-mobile"]
        precisions = ["fp32", "int8"]
        [options]
        iterations = 1
        warmup = 0
        [models.tiny_a]
        path = "tiny_a.onnx"
        task = "text-classification"
        [models.tiny_b]
        path = "tiny_b.onnx"
        input_shapes = { input_ids = "1x16" }
        """)
    out = tmp_path / "out"
    proc = subprocess.run([MTCONVERT, "matrix", path, "--out", out, "-j", "2", "--report-json",
                           tmp_path / "m.json", "--junit", tmp_path / "m.xml", "--markdown",
                           tmp_path / "m.md", "--html", tmp_path / "m.html", "-v"],
                          capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = MatrixReport.from_json((tmp_path / "m.json").read_text())
    assert [(c.model, c.precision, c.status) for c in report.cells] == [
        ("tiny_a", "fp32", "passed"), ("tiny_a", "int8", "passed"),
        ("tiny_b", "fp32", "passed"), ("tiny_b", "int8", "passed")]
    assert report.exit_code == 0 and report.cells[0].task == "text-classification"
    assert report.cells[2].report.input_shapes["input_ids"] == [1, 16]
    assert (out / "tiny_a" / "onnx-mobile-int8" / "tiny_a.int8.ort").is_file()
    assert sorted(p.name for p in (out / "cells").iterdir()) == [
        f"{m}.onnx-mobile.{p}.json" for m in ("tiny_a", "tiny_b") for p in ("fp32", "int8")]
    assert MatrixReport.from_json((out / "matrix.json").read_text()) == report
    # one line per finished cell on stderr (not a terminal), the grid on stdout
    assert sum(line.startswith("[") for line in proc.stderr.splitlines()) == 4
    assert "4/4 cells passed" in proc.stdout
    xml = JUnitXml.fromfile(str(tmp_path / "m.xml"))
    assert [s.name for s in xml] == ["tiny_a", "tiny_b"]
    assert (xml.tests, xml.failures, xml.errors) == (4, 0, 0)
    assert "| tiny\\_a | text-classification | ✅ passed" in (tmp_path / "m.md").read_text()
    assert (tmp_path / "m.html").read_text().count(">passed") == 4


# --- faults ----------------------------------------------------------------------------------
FAULTY = """
    targets = ["fake"]
    [options]
    iterations = 1
    warmup = 0
    [models.good]
    path = "tiny_a.onnx"
    [models.killed]
    path = "tiny_a.onnx"
    targets = ["fake-killed"]
    [models.hung]
    path = "tiny_b.onnx"
    targets = ["fake-hung"]
    [models.missing]
    path = "missing.onnx"
    """


def test_dead_hung_and_unreadable_cells_are_errors_the_others_finish(tmp_path):
    reg = _registry()
    spec = matrix_spec.load(_write(tmp_path, FAULTY), tmp_path / "out", reg)
    events = []
    t0 = time.monotonic()
    report = matrix.run(spec, matrix.MatrixOptions(out_dir=tmp_path / "out", jobs=2,
                                                   cell_timeout=15),
                        registry=reg, progress=events.append)
    assert time.monotonic() - t0 < 90
    cells = {c.model: c for c in report.cells}
    assert cells["good"].status == "passed" and cells["good"].report.numerics.passed
    assert cells["killed"].status == "error" and "SIGKILL" in cells["killed"].error
    assert cells["hung"].status == "error" and "timed out after 15 s" in cells["hung"].error
    assert cells["missing"].status == "error" and "not found" in cells["missing"].error
    assert report.exit_code == 3
    assert [e.done for e in events if e.kind == "done"] == [1, 2, 3, 4]
    assert len(list((tmp_path / "out" / "cells").glob("*.json"))) == 4
    # the renderers: the grid and each failing cell's reason; JUnit agrees with exit code 3
    text = _console(report)
    assert "1/4 cells passed (3 error)" in text and "killed/fake-killed/fp32: the cell's" in text
    xml = JUnitXml.fromstring(_junit(report))
    assert [s.name for s in xml] == ["good", "killed", "hung", "missing"]
    assert (xml.tests, xml.failures, xml.errors) == (4, 0, 3)
    assert MatrixReport.from_json(report.to_json()) == report


def _console(report) -> str:
    import io

    buf = io.StringIO()
    render("console", report, buf)
    return buf.getvalue()


def _junit(report) -> str:
    import io

    buf = io.BytesIO()
    render("junit", report, buf)
    return buf.getvalue().decode()


def test_resume_keeps_finished_cells_and_reruns_the_rest(tmp_path):
    reg = _registry()
    path = _write(tmp_path, 'targets = ["fake"]\nprecisions = ["fp32", "fp16"]\n' + QUICK
                  + '[models.tiny_a]\npath = "tiny_a.onnx"\n')
    out = tmp_path / "out"
    first = matrix.run(matrix_spec.load(path, out, reg), matrix.MatrixOptions(out, jobs=2),
                       registry=reg)
    assert [c.status for c in first.cells] == ["passed", "passed"]
    (out / "cells" / "tiny_a.fake.fp16.json").unlink()  # as if killed before it finished
    again = matrix.run(matrix_spec.load(path, out, reg),
                       matrix.MatrixOptions(out, jobs=2, resume=True), registry=reg)
    assert [(c.status, c.resumed) for c in again.cells] == [("passed", True), ("passed", False)]
    assert again.cells[0].report == first.cells[0].report
    assert again.settings["resumed_cells"] == 1
    # a changed option is another cell: run again, not kept
    path.write_text(path.read_text().replace("iterations = 1", "iterations = 2"))
    changed = matrix.run(matrix_spec.load(path, out, reg),
                         matrix.MatrixOptions(out, jobs=2, resume=True), registry=reg)
    assert [c.resumed for c in changed.cells] == [False, False]


def test_ctrl_c_stops_cleanly_without_orphans(tmp_path):
    _write(tmp_path, FAULTY)
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from mtconvert import matrix_spec
        from mtconvert.run import matrix
        from tests.converter.test_matrix import _registry
        reg = _registry()
        out = Path({str(tmp_path / 'out')!r})
        spec = matrix_spec.load(Path({str(tmp_path / 'zoo.toml')!r}), out, reg)
        spec = matrix_spec.MatrixSpec(spec.file, tuple(c for c in spec.cells
                                                       if c.model in ("good", "hung")))
        try:
            matrix.run(spec, matrix.MatrixOptions(out, jobs=2), registry=reg,
                       progress=lambda e: print(e.kind, e.id, flush=True))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # the good cell finished; the hung one is converting forever
        lines.append(line.strip())
        if line.startswith("done"):
            break
    family = psutil.Process(proc.pid).children(recursive=True)
    assert family, "the hung cell's processes"
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "interrupted" in rest
    time.sleep(0.5)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
             and "resource_tracker" not in " ".join(p.cmdline())]
    assert alive == []
    assert [p.name for p in (tmp_path / "out" / "cells").iterdir()] == ["good.fake.fp32.json"]


# --- Ray -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=80 * 2**20)
    yield ray
    ray.shutdown()


def test_ray_executor_on_a_local_instance(tmp_path, local_ray):
    path = _write(tmp_path, 'targets = ["onnx-mobile"]\n' + QUICK
                  + '[models.tiny_a]\npath = "tiny_a.onnx"\n'
                  + '[models.missing]\npath = "missing.onnx"\n'
                  + '[models.killed]\npath = "tiny_a.onnx"\ntargets = ["fake-killed"]\n')
    out = tmp_path / "out"
    events = []
    reg = _registry()
    reg.add(next(e for e in Registry.from_entry_points().entries.values()
                 if e.name == "onnx-mobile"))
    report = matrix.run(matrix_spec.load(path, out, reg),
                        matrix.MatrixOptions(out, executor="ray", memory_per_cell=300 * 2**20),
                        registry=reg, progress=events.append)
    assert [(c.model, c.status) for c in report.cells] == [
        ("tiny_a", "passed"), ("missing", "error"), ("killed", "error")]
    assert "not found" in report.cells[1].error and report.exit_code == 3
    assert "SIGKILL" in report.cells[2].error  # the task's cell process died; the task did not
    assert report.settings["executor"] == "ray" and report.settings["memory_per_cell"]
    assert sorted(e.id for e in events if e.kind == "done") == [
        "killed/fake-killed/fp32", "missing/onnx-mobile/fp32", "tiny_a/onnx-mobile/fp32"]
    assert (out / "cells" / "tiny_a.onnx-mobile.fp32.json").is_file()
    assert local_ray.is_initialized()  # the matrix used the running instance, left it running


# --- the cache under concurrent writers -------------------------------------------------------
def _convert_at_once(model: str, out: str, barrier) -> dict:  # noqa: ANN001
    import mtconvert

    barrier.wait()
    report = mtconvert.convert(model, targets=["fake-slow"], out_dir=out, registry=_registry(),
                               iterations=1, warmup=0)
    t = report.targets["fake-slow"]
    return {"status": t.status, "cached": t.conversion.cached,
            "artifact": Path(t.artifacts[0].path).read_bytes().hex()}


def test_cache_shared_by_processes_converts_each_entry_once(tmp_path, monkeypatch):
    model = tiny_encoder(tmp_path / "tiny.onnx")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MTCONVERT_CACHE_DIR", str(cache))
    monkeypatch.setenv("SLOW_COUNT", str(tmp_path / "conversions"))
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            results = pool.starmap(_convert_at_once, [(str(model), str(tmp_path / f"o{i}"),
                                                       barrier) for i in range(3)])
    assert [r["status"] for r in results] == ["passed"] * 3
    assert sorted(r["cached"] for r in results) == [False, True, True]
    assert len((tmp_path / "conversions").read_text().split()) == 1  # converted once
    assert {r["artifact"] for r in results} == {model.read_bytes().hex()}
    # one conversion entry, whole (beside it: the source cache sources/, code-imports.json)
    entries = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")
               and p.name != "sources"]
    assert len(entries) == 1 and json.loads((entries[0] / "entry.json").read_text())
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]  # nothing torn


def test_config_file_options_sit_beneath_the_matrix_files(tmp_path, monkeypatch):
    from mtconvert import matrix_cli

    (tmp_path / "mtconvert.toml").write_text('seed = 3\niterations = 9\nprecision = "fp16"\n'
                                             'report_json = "r.json"\n')
    monkeypatch.chdir(tmp_path)
    defaults = matrix_cli._config({"config": None})
    assert defaults == {"seed": 3, "iterations": 9}  # precision and report files: the matrix's
    path = _write(tmp_path, 'targets = ["ort"]\n[options]\niterations = 2\n'
                  '[models.tiny_a]\npath = "tiny_a.onnx"\n')
    (cell,) = matrix_spec.load(path, tmp_path / "out", defaults=defaults).cells
    opts = matrix_spec.build_options(cell)
    assert (opts.seed, opts.iterations, opts.precision) == (3, 2, "fp32")


# --- the Python API ---------------------------------------------------------------------------
def test_api_matrix_returns_the_report_from_a_file_or_a_dict(tmp_path):
    import mtconvert

    reg = _registry()
    path = _write(tmp_path, 'targets = ["fake"]\n[models.tiny_a]\npath = "tiny_a.onnx"\n')
    events = []
    report = mtconvert.matrix(path, tmp_path / "out", registry=reg, jobs=1, iterations=1,
                              warmup=0, progress=events.append)
    assert isinstance(report, mtconvert.MatrixReport)
    assert [(c.id, c.status) for c in report.cells] == [("tiny_a/fake/fp32", "passed")]
    assert report.cells[0].report.numerics.passed and report.exit_code == 0
    assert [e.kind for e in events] == ["start", "done"]
    assert MatrixReport.from_json((tmp_path / "out" / "matrix.json").read_text()) == report
    # keyword run options sit beneath the file's: iterations reached the cell
    assert json.loads((tmp_path / "out" / "cells" / "tiny_a.fake.fp32.json").read_text())[
        "report"]["settings"]["iterations"] == 1
    # a parsed dict (paths from the current folder), and a bad option as a UsageError
    data = {"targets": ["fake"], "models": {"b": {"path": str(tmp_path / "tiny_b.onnx")}}}
    again = mtconvert.matrix(data, tmp_path / "out2", registry=reg, jobs=1, iterations=1,
                             warmup=0)
    assert [c.id for c in again.cells] == ["b/fake/fp32"] and again.ok
    with pytest.raises(UsageError, match="unknown option 'bogus'"):
        mtconvert.matrix(path, tmp_path / "out3", registry=reg, bogus=1)
    with pytest.raises(UsageError, match="--jobs must be at least 1"):
        mtconvert.matrix(path, tmp_path / "out3", registry=reg, jobs=0)
