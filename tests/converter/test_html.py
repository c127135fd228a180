"""The HTML report (``--html``) in a real browser: headless Chromium lays it out and draws it;
the plots are there, have a size and are not blank; nothing is fetched; every string from the
report is escaped. Also the report data the page draws (latency samples, error histograms)."""
from __future__ import annotations

import dataclasses
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import mtconvert
from mtconvert import render
from mtconvert.registry import Registry
from mtconvert.report import Report, TargetMap
from mtconvert.validators.compare import PROFILES, compare_output, error_histogram
from tests.fake_backend import (FakeBackend, FixedShapeFakeBackend, OtherFakeBackend,
                                TracedFakeBackend)
from tests.models import tiny_encoder

CHROMIUM = next((p for name in ("chromium", "chromium-browser", "google-chrome")
                 if (p := shutil.which(name))), None)
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (`make setup` installs Debian's "
                             "chromium when run as root; or: apt-get install -y chromium)")
MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
ROOT = Path(__file__).resolve().parents[2]
WIDTH = 1280
HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">$\\frac{1}{0}$ & "q"'

# appended to a copy of the page (whose CSP would block it): once the page has loaded, every
# plot's box in page coordinates, whether its image decoded, and every resource fetched
MEASURE = """<script>window.addEventListener('load', () => {
  const plots = [...document.querySelectorAll('img, svg')].map(e => {
    const b = e.getBoundingClientRect();
    return {alt: e.getAttribute('alt'), x: b.left + scrollX, y: b.top + scrollY, w: b.width,
            h: b.height, natural: e.naturalWidth || 0, complete: !!e.complete}; });
  const pre = document.createElement('pre');
  pre.id = 'measured';
  pre.textContent = JSON.stringify({plots, height: document.documentElement.scrollHeight,
    fetched: performance.getEntriesByType('resource').map(e => e.name)});
  document.body.appendChild(pre);
});</script>"""


@pytest.fixture(scope="module")
def fake_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    """Four fake targets: passed, failed with a localized divergence, a conversion error, and
    failed on a lint error."""
    tmp = tmp_path_factory.mktemp("fake")
    reg = Registry()
    for backend in (FakeBackend, OtherFakeBackend, FixedShapeFakeBackend, TracedFakeBackend):
        reg.register(backend)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTCONVERT_CACHE_DIR", str(tmp / "cache"))
        return mtconvert.convert(
            tiny_encoder(tmp / "tiny.onnx"), targets=["fake", "fake-traced", "fake2", "fake-fixed"],
            out_dir=tmp / "out", registry=reg, iterations=12, warmup=1,
            extra={"fake-traced": {"noise_if_op": "Div"}, "fake2": {"convert_error": True},
                   "fake-fixed": {"lint_error": True}})


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report]:
    """A real onnx-mobile conversion of the BERT fixture through the CLI, with --html."""
    tmp = tmp_path_factory.mktemp("bert")
    proc = subprocess.run(
        [MTCONVERT, str(ROOT / "fixtures" / "bert_encoder.onnx"), "--to", "onnx-mobile",
         "--out", str(tmp / "out"), "--html", str(tmp / "report.html"), "--report-json",
         str(tmp / "report.json"), "--iterations", "15", "-q"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "MTCONVERT_CACHE_DIR": str(tmp / "cache")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "report.html", Report.from_json((tmp / "report.json").read_text())


# ---------------------------------------------------------------- the data the page draws

def test_error_histogram_counts_every_value():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 100)).astype(np.float32)
    out = ref + rng.normal(scale=1e-5, size=ref.shape).astype(np.float32)
    out[0, :3] = ref[0, :3]
    out[1, 0] = np.nan
    h = error_histogram(ref, out)
    assert h["zero"] >= 3 and h["nonfinite"] == 1
    assert sum(h["counts"]) + h["zero"] + h["nonfinite"] == ref.size
    assert len(h["edges"]) == len(h["counts"]) + 1 and h["edges"] == sorted(h["edges"])
    err = np.abs(out.astype(np.float64) - ref)
    err = err[np.isfinite(err) & (err > 0)]
    assert h["edges"][0] <= err.min() and err.max() <= h["edges"][-1]
    assert error_histogram(ref, ref) == {"edges": [], "counts": [], "zero": ref.size,
                                         "nonfinite": 0}
    res = compare_output("y", ref, out, PROFILES["fp32"])
    assert res.to_dict()["abs_error_histogram"] == h
    json.dumps(res.to_dict(), allow_nan=False)


def test_latency_samples_round_trip_and_old_reports_load(fake_report):
    lat = fake_report.targets["fake"].latency
    # interleaved timing: at least the 12 asked for (rounds of at least 25 ms per side)
    assert len(lat.samples_ms) == lat.iterations >= 12 and all(s > 0 for s in lat.samples_ms)
    assert len(fake_report.reference.latency.samples_ms) == 12
    assert Report.from_json(fake_report.to_json()) == fake_report
    d = json.loads(fake_report.to_json())
    for t in d["targets"]:
        if t["latency"]:
            del t["latency"]["samples_ms"]
    old = Report.from_dict(d)
    assert old.targets["fake"].latency.samples_ms == ()
    assert "<img" in render_text(old)  # an older report still renders, latency from percentiles


# ---------------------------------------------------------------- the page itself

def render_text(report: Report) -> str:
    buf = io.StringIO()
    render.render("html", report, buf)
    return buf.getvalue()


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(text: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(text)
    return parser.tags


def _hostile(report: Report) -> Report:
    """Every kind of string the page shows, replaced by markup."""
    src = dataclasses.replace(report.source, path=f"/models/{HOSTILE}.onnx")
    targets = []
    for t in report.targets.values():
        numerics = t.numerics and dataclasses.replace(
            t.numerics, outputs={f"{k}{HOSTILE}": v | {"reason": HOSTILE}
                                 for k, v in t.numerics.outputs.items()})
        diagnostics = t.diagnostics and t.diagnostics | {
            "first_divergence": {**t.diagnostics.get("first_divergence", {}), "node": HOSTILE},
            "method": HOSTILE}
        targets.append(dataclasses.replace(
            t, name=f"{t.name}{HOSTILE}", reason=HOSTILE, numerics=numerics,
            diagnostics=diagnostics,
            findings=({"severity": "error", "code": HOSTILE, "message": HOSTILE},),
            artifacts=tuple(dataclasses.replace(a, path=f"/out/{HOSTILE}") for a in t.artifacts),
            conversion=t.conversion and dataclasses.replace(t.conversion, steps=(HOSTILE,))))
    return dataclasses.replace(report, source=src, targets=TargetMap(targets))


def test_page_is_self_contained_and_escapes_report_strings(fake_report, tmp_path):
    text = render_text(_hostile(fake_report))
    tags = _tags(text)
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
    assert not [(t, a) for t, a in tags for k in a if k.startswith("on")]
    imgs = [a for t, a in tags if t == "img"]
    assert imgs and all(a["src"].startswith("data:image/svg+xml;base64,") for a in imgs)
    assert not re.search(r"(src|href)=\"(?!data:|#)", text)
    assert "url(" not in text.split("</style>")[0] and "@import" not in text
    csp = [a for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    assert HOSTILE not in text and html.escape(HOSTILE) in text


def test_without_matplotlib_the_page_has_notes_instead_of_plots(fake_report, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    text = render_text(fake_report)
    assert "<img" not in text and "pip install &#x27;mtconvert[html]&#x27;" in text
    assert '<table class="summary">' in text and "First divergence" in text


# ---------------------------------------------------------------- in Chromium

def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp)
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-quic", "--hide-scrollbars", f"--user-data-dir={profile}",
         *args], capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _measure(page: Path, tmp: Path) -> tuple[str, dict]:
    """The page's DOM after layout, and what MEASURE found (on a copy without the CSP)."""
    copy = tmp / f"measure-{page.name}"
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text())
    copy.write_text(text.replace("</body>", MEASURE + "</body>"))
    dom = _chromium(tmp, f"--window-size={WIDTH},1000", "--virtual-time-budget=10000",
                    "--dump-dom", copy.as_uri()).stdout
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found, "the measuring script did not run"
    return dom, json.loads(html.unescape(found.group(1)))


def _screenshot(page: Path, tmp: Path, height: int) -> np.ndarray:
    """The page as Chromium draws it, CSP and all, as an RGB array."""
    from PIL import Image

    png = tmp / f"{page.stem}.png"
    _chromium(tmp, f"--window-size={WIDTH},{height}", f"--screenshot={png}", page.as_uri())
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"))


def _check_plots(page: Path, tmp: Path, expected_alts: set[str]) -> dict[str, np.ndarray]:
    """Every expected plot exists, decoded, with a size, and is drawn (not blank) on the
    screenshot; returns each plot's pixels by alt text."""
    dom, m = _measure(page, tmp)
    assert m["fetched"] == [], f"the page fetched {m['fetched']}"
    plots = {p["alt"]: p for p in m["plots"]}
    assert expected_alts <= set(plots), sorted(plots)
    shot = _screenshot(page, tmp, min(int(m["height"]) + 20, 16000))
    pixels = {}
    for alt, p in plots.items():
        assert p["complete"] and p["natural"] > 0, f"{alt}: image did not decode"
        assert p["w"] > 250 and p["h"] > 100, f"{alt}: laid out at {p['w']}x{p['h']}"
        x, y, w, h = (int(round(p[k])) for k in ("x", "y", "w", "h"))
        assert y + h <= shot.shape[0] and x + w <= shot.shape[1], f"{alt}: off the screenshot"
        region = shot[y:y + h, x:x + w].astype(int)
        ink = (np.abs(region - 255).sum(axis=2) > 60).mean()
        colors = len(np.unique(region.reshape(-1, 3), axis=0))
        assert ink > 0.01 and colors > 20, f"{alt}: blank ({ink:.2%} ink, {colors} colours)"
        pixels[alt] = region
    return pixels


def _has(region: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> bool:
    return bool((np.abs(region - np.array(rgb)).sum(axis=2) < tol).any())


RED, GREEN = (215, 72, 82), (66, 150, 90)  # the failed and passed fills (alpha 0.8-0.85)


@needs_browser
def test_fake_report_in_chromium(fake_report, tmp_path):
    page = tmp_path / "fake.html"
    render.write_files(fake_report, {"report_html": page})
    pixels = _check_plots(page, tmp_path, {
        "latency distribution per runtime", "metrics of fake per output",
        "metrics of fake-traced per output", "error histograms of fake-traced"})
    assert _has(pixels["error histograms of fake-traced"], RED)
    assert _has(pixels["metrics of fake-traced per output"], RED)
    assert _has(pixels["metrics of fake per output"], GREEN)
    dom, _ = _measure(page, tmp_path)
    summary = re.search(r'<table class="summary">.*?</table>', dom, re.S).group(0)
    assert summary.count("<tr>") == 1 + len(fake_report.targets)
    first = fake_report.targets["fake-traced"].diagnostics["first_divergence"]
    assert "First divergence" in dom and f"<code>{first['node']}</code>" in dom
    assert "copy source" in dom and "op FakeOp is not supported on phones" in dom
    assert "the fake tool failed" in dom


@needs_browser
def test_hostile_strings_stay_text_in_chromium(fake_report, tmp_path):
    page = tmp_path / "hostile.html"
    render.render("html", _hostile(fake_report), page)
    dom = _chromium(tmp_path, f"--window-size={WIDTH},1000", "--dump-dom",
                    page.as_uri()).stdout
    tags = _tags(dom)
    assert not [t for t, _ in tags if t == "script"]
    assert not [(t, a) for t, a in tags for k in a if k.startswith("on")]
    assert html.escape(HOSTILE, quote=False) in dom  # shown as text


@needs_browser
def test_real_onnx_mobile_report_in_chromium(bert_run, tmp_path):
    page, report = bert_run
    t = report.targets["onnx-mobile"]
    assert t.status == "passed" and len(t.latency.samples_ms) >= 15  # interleaved: at least
    expected = {"latency distribution per runtime", "metrics of onnx-mobile per output"}
    if any(m["abs_error_histogram"]["counts"] for m in t.numerics.outputs.values()):
        expected.add("error histograms of onnx-mobile")
    _check_plots(page, tmp_path, expected)
    dom, _ = _measure(page, tmp_path)
    for step in t.conversion.steps:
        assert html.escape(step, quote=False) in dom
    assert all(html.escape(f["message"], quote=False) in dom for f in t.findings)


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"]])
def test_cli_start_up_imports_no_matplotlib(argv):
    code = ("import sys, json\nfrom mtconvert.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(json.dumps([m for m in ('matplotlib', 'PIL', 'mtconvert.render.html') "
            "if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "--html" in proc.stdout or argv == ["--help"]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_deployment_snippets_are_in_the_page_escaped():
    from mtconvert.render.html import to_html
    from mtconvert.report import ReferenceInfo, SourceInfo, TargetMap, TargetReport

    t = TargetReport("fake", "passed", snippets={"python": "x = run('<model>')\n",
                                                 "kotlin": "val y = 1"})
    src = SourceInfo("/m.onnx", "onnx", None, (), (), {})
    page = to_html(Report(src, ReferenceInfo("onnxruntime-cpu", "1.0", None), TargetMap([t])))
    assert "Deployment snippets" in page and "Kotlin" in page
    assert "x = run(&#x27;&lt;model&gt;&#x27;)" in page or "&lt;model&gt;" in page
    assert "<model>" not in page
