"""Broken and hostile inputs end in exit 2 with one line, no traceback, no hang, nothing in
--out, and no pickle ever executed. Plus a bounded fuzz test of the source loader."""
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.converter.hostile_corpus import MARKER, build
from tests.models import tiny_encoder

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "models"
    folder.mkdir()
    return folder, build(folder)


def test_corpus_has_at_least_50_cases(corpus):
    assert len(corpus[1]) >= 50


def _case_ids():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        return sorted(build(folder))


@pytest.mark.parametrize("case", _case_ids())
def test_hostile_input_exit_2_one_line(case, corpus, tmp_path):
    folder, cases = corpus
    path, args = cases[case]
    out = tmp_path / "out"
    proc = subprocess.run([MTCONVERT, str(path), "--to", "onnx-mobile", "--out", str(out),
                           "--iterations", "1", "--warmup", "0", *args],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, f"{case}: rc={proc.returncode}\n{proc.stderr}{proc.stdout}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtconvert: error:"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists() or not any(out.iterdir())
    assert not (folder / MARKER).exists(), "a pickle was executed"


def test_pickle_refusal_explains_and_trust_loads(corpus, tmp_path):
    import numpy as np

    folder, cases = corpus
    proc = subprocess.run([MTCONVERT, str(cases["scripted.pt"][0]), "--to", "ort",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "arbitrary code" in proc.stderr and "--trust-pickle" in proc.stderr
    np.savez(tmp_path / "in.npz", x=np.ones((1, 4), np.float32))
    proc = subprocess.run([MTCONVERT, str(cases["scripted.pt"][0]), "--to", "ort", "--out",
                           str(tmp_path / "o"), "--trust-pickle", "--inputs",
                           str(tmp_path / "in.npz"), "--iterations", "1", "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout


FUZZ_SEED = tiny_encoder(Path(__import__("tempfile").mkdtemp()) / "fuzz.onnx").read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(flips=st.lists(st.tuples(st.integers(0, len(FUZZ_SEED) - 1), st.integers(1, 255)),
                      min_size=1, max_size=8), cut=st.integers(0, len(FUZZ_SEED)))
def test_fuzz_loader_raises_only_clean_errors(flips, cut, tmp_path_factory):
    from mtconvert.errors import MtConvertError
    from mtconvert.source import load

    data = bytearray(FUZZ_SEED[:cut] if cut > 16 else FUZZ_SEED)
    for pos, mask in flips:
        if pos < len(data):
            data[pos] ^= mask
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "m.onnx"
    path.write_bytes(bytes(data))
    try:
        load(path, folder)
    except MtConvertError as exc:
        assert str(exc) and "\n" not in str(exc).strip()


@pytest.mark.slow
def test_ctrl_c_leaves_out_consistent(fixtures_dir, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: exit 130, no staging folder,
    and every file in --out is a finished one."""
    import os
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([MTCONVERT, str(fixtures_dir / "bert_encoder.onnx"), "--no-cache",
                             "--out", str(out), "-q"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    names = sorted(os.listdir(out)) if out.exists() else []
    assert not [n for n in names if n.startswith(".mtconvert-staging")]
    for artifact in (n for n in names if n.endswith((".ort", ".tflite"))):
        assert (out / artifact).stat().st_size > 0
