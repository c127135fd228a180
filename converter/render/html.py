"""A self-contained HTML report (``--html PATH``): the summary table, the latency distributions
of the reference and every target, and per target its metric bars against the tolerances, its
error histograms, the localization result, the conversion steps and the findings.

One file and nothing fetched: the plots are matplotlib SVGs in ``data:`` URIs (text drawn as
paths, so no fonts either), the style is inline, and a Content-Security-Policy forbids scripts
and every network request. Every string taken from the report is escaped. matplotlib is imported
here only, when a report is rendered; without it the report is still written, with a note in
place of each plot (``pip install 'mtconvert[html]'``).
"""
from __future__ import annotations

import base64
import io
import json
import math
from html import escape
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mtconvert.render import ratio_text
from mtconvert.render.console import _fmt_bytes, _num

if TYPE_CHECKING:
    from mtconvert.report import Latency, Report, TargetReport

COLORS = {"passed": "#1a7f37", "failed": "#cf222e", "error": "#8250df", "skipped": "#9a6700",
          "none": "#8c959f", "reference": "#0969da"}
MAX_HISTOGRAMS = 12  # outputs with an error histogram per target (failing and largest first)
MAX_BARS = 30  # outputs in the metric bars per target
FIG_WIDTH = 10.0  # inches; 96 px each in the page
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render(report: Report, destination: Path | IO[str]) -> None:
    """To a file (written atomically) or a text stream."""
    from mtconvert.render import emit

    emit(destination, to_html(report))


def to_html(report: Report) -> str:
    plots = _Plots()
    name = Path(report.source.path).name if report.source.path else "in-memory module"
    body = [_header(report), _summary(report), _latency_section(report, plots),
            *(_target(i, t, report, plots) for i, t in enumerate(report.targets.values())),
            f"<footer>mtconvert {_e(report.mtconvert_version)} · report schema "
            f"{report.schema_version} · {_e(report.created)}</footer>"]
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>mtconvert report: {_e(name)}</title>\n<style>{STYLE}</style>\n</head>\n"
            f'<body>\n<main>\n{"".join(body)}\n</main>\n</body>\n</html>\n')


# ---------------------------------------------------------------- page parts

def _header(report: Report) -> str:
    src, ref = report.source, report.reference
    passed = sum(t.status == "passed" for t in report.targets.values())
    verdict = "passed" if report.ok else "failed"
    facts = [("model", f"<code>{_e(src.path or '(in-memory module)')}</code>"),
             ("format", _e(src.format)),
             ("sha256", f"<code>{_e(src.sha256)}</code>" if src.sha256 else "-")]
    if src.sparsity:
        from mtconvert.render import sparsity_line

        facts.append(("sparsity", _e(sparsity_line(src.sparsity))))
    if ref:
        p50 = ref.latency.p50_ms if ref.latency else None
        facts.append(("reference", f"{_e(ref.runtime)} {_e(ref.version or '')}, p50 "
                                   f"{_num(p50, '.3f')} ms"))
    settings = ", ".join(f"{_e(k)} {_e(_plain(v))}" for k, v in report.settings.items())
    facts.append(("settings", settings or "-"))
    inputs = "".join(
        f"<tr><td><code>{_e(i.get('name'))}</code></td>"
        f"<td>{_e(_shape(src.input_shapes.get(i.get('name'), i.get('shape'))))}</td>"
        f"<td>{_e(i.get('dtype', ''))}</td>"
        f"<td>{_e(src.input_values.get(i.get('name'), ''))}</td></tr>" for i in src.inputs)
    return (f"<header><h1>mtconvert report</h1>"
            f'<p class="verdict v-{verdict}">{verdict.upper()} <span>{passed}/'
            f"{len(report.targets)} targets passed (exit code {report.exit_code})</span></p>"
            f"{_kv(facts)}"
            + (f"<h3>Inputs</h3><table><thead><tr><th>input</th><th>shape</th><th>dtype</th>"
               f"<th>values</th></tr></thead><tbody>{inputs}</tbody></table>" if inputs else "")
            + "</header>")


SUMMARY_COLUMNS = ("target", "status", "worst output", "max abs", "cosine", "p50 ms",
                   "vs reference", "size", "peak RSS", "convert")


def _summary(report: Report) -> str:
    ref = report.reference
    ref_p50 = ref.latency.p50_ms if ref and ref.latency else None
    rows = []
    for i, t in enumerate(report.targets.values()):
        worst = (t.numerics.worst or {}) if t.numerics else {}
        p50 = t.latency.p50_ms if t.latency else None
        cells = [f'<a href="#target-{i}">{_e(t.name)}</a> <span class="dim">'
                 f"{_e(t.precision)}</span>", _pill(t.status),
                 _e(worst.get("output", "-")), _num(worst.get("max_abs"), ".2e"),
                 _num(worst.get("cosine"), ".6f"), _num(p50, ".3f"),
                 ratio_text(t.ratio_to_reference(ref_p50)),
                 _fmt_bytes(sum(a.bytes for a in t.artifacts)) if t.artifacts else "-",
                 f"{t.memory.peak_rss_mb:.0f} MB" if t.memory else "-",
                 f"{t.conversion.seconds:.1f} s" + (" (cached)" if t.conversion.cached else "")
                 if t.conversion else "-"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{c}</th>" for c in SUMMARY_COLUMNS)
    return (f'<section><h2>Summary</h2><table class="summary"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></section>')


def _latency_section(report: Report, plots: _Plots) -> str:
    rows: list[tuple[str, str, Latency]] = []
    if report.reference and report.reference.latency:
        rows.append((f"reference ({report.reference.runtime})", COLORS["reference"],
                     report.reference.latency))
    rows += [(f"{t.name} {t.precision}", COLORS[t.status], t.latency)
             for t in report.targets.values() if t.latency]
    if not rows:
        return ""
    note = ("<p class=\"dim\">Each timed run as a dot, the box from the 25th to the 75th "
            "percentile with the median; whiskers at the 5th and 95th. Threads: "
            f"{_e(report.settings.get('threads', '-'))}.</p>")
    no_samples = [label for label, _, lat in rows if not lat.samples_ms]
    if no_samples:
        note += (f"<p class=\"dim\">No samples recorded for {_e(', '.join(no_samples))} "
                 "(an older report): p50, p90 and p99 are shown.</p>")
    if report.reference and report.reference.profile:
        note += f"<h3>Reference</h3>{profile_section(report.reference.profile)}"
    return (f"<section><h2>Latency</h2>"
            f"{plots.draw(_latency_figure, rows, alt='latency distribution per runtime')}"
            f"{note}</section>")


def _target(i: int, t: TargetReport, report: Report, plots: _Plots) -> str:
    parts = [f'<section class="target" id="target-{i}"><h2>{_e(t.name)} '
             f'<span class="dim">{_e(t.precision)}</span> {_pill(t.status)}</h2>']
    if t.reason:
        parts.append(f'<p class="reason r-{t.status}">{_e(t.reason)}</p>')
    parts.append(_facts(t, report))
    if t.numerics:
        parts.append(_numerics(t, plots))
    if t.sweep:
        parts.append(_sweep(t))
    if t.diagnostics:
        parts.append(_localization(t.diagnostics))
    if (t.diagnostics or {}).get("quantization_error"):
        from mtconvert.render import quant_error_lines

        lines = quant_error_lines(t.diagnostics["quantization_error"])
        parts.append(f"<h3>Quantization error per layer</h3><p>{_e(lines[0])}</p><ul>"
                     + "".join(f"<li>{_e(x)}</li>" for x in lines[1:]) + "</ul>")
    if t.float_fallback:
        from mtconvert.render import float_fallback_line

        parts.append(f"<p>{_e(float_fallback_line(t.float_fallback))}</p>")
    if t.conversion:
        parts.append(_conversion(t))
    if t.findings:
        parts.append(_findings(t))
    if t.generation:
        parts.append(_generation(t.generation))
    if t.profile:
        parts.append(profile_section(t.profile))
    if t.snippets:
        parts.append(_snippets(t))
    parts.append("</section>")
    return "".join(parts)


def _generation(g: dict[str, Any]) -> str:
    """Generative models: the headline, and the token ids side by side where they differ."""
    from mtconvert.render import generation_differences, generation_headline

    rows = "".join(f"<tr><td>{k}</td><td>{r}</td><td>{'-' if o is None else o}</td></tr>"
                   for k, r, o in generation_differences(g))
    table = (f"<table><thead><tr><th>step</th><th>reference token</th><th>target token</th>"
             f"</tr></thead><tbody>{rows}</tbody></table>" if rows else "")
    ids = (f"<p>prompt {_e(g.get('prompt_tokens'))}; generated (reference) "
           f"{_e(g.get('reference_tokens'))}</p>" if "steps" in g else "")
    return f"<h3>Generation</h3><p>{_e(generation_headline(g))}</p>{ids}{table}"


def profile_section(profile: dict[str, Any]) -> str:
    """--profile: the headline and a table of the slowest operators."""
    from mtconvert.render import PROFILE_ROWS, profile_headline

    rows = "".join(f"<tr><td>{op['ms']:.3f}</td><td>{op['share']:.1%}</td>"
                   f"<td>{_e(op['op_type'])}</td><td><code>{_e(op['name'])}</code></td></tr>"
                   for op in profile.get("ops", [])[:PROFILE_ROWS])
    table = (f"<table><thead><tr><th>ms</th><th>share</th><th>op type</th><th>operator</th>"
             f"</tr></thead><tbody>{rows}</tbody></table>" if rows else "")
    return f"<h3>Where the time goes</h3><p>{_e(profile_headline(profile))}</p>{table}"


_LANGUAGES = {"kotlin": "Kotlin", "swift": "Swift", "cpp": "C++", "python": "Python"}


def _snippets(t: TargetReport) -> str:
    """The backend's load-and-run code for the artifact, one collapsed block per language."""
    blocks = "".join(f"<details><summary>{_e(_LANGUAGES.get(lang, lang))}</summary>"
                     f"<pre>{_e(code)}</pre></details>" for lang, code in t.snippets.items())
    return f"<h3>Deployment snippets</h3>{blocks}"


def _facts(t: TargetReport, report: Report) -> str:
    facts = []
    if t.numerics:
        facts.append(("runtime", _e(t.numerics.runtime)))
    if t.latency:
        lat = t.latency
        ref = report.reference.latency if report.reference else None
        vs = f" ({lat.p50_ms / ref.p50_ms:.2f}x the reference)" if ref and ref.p50_ms else ""
        facts.append(("latency", f"p50 {lat.p50_ms:.3f} ms, p90 {lat.p90_ms:.3f}, p99 "
                                 f"{lat.p99_ms:.3f}, mean {lat.mean_ms:.3f}{vs}; "
                                 f"{lat.iterations} runs after {lat.warmup} warm-up, "
                                 f"{lat.threads} threads"))
    elif t.latency_unavailable:
        facts.append(("latency", f"not measured: {_e(t.latency_unavailable)}"))
    if t.memory:
        base = (f" (before loading the model: {t.memory.baseline_rss_mb:.0f} MB)"
                if t.memory.baseline_rss_mb is not None else "")
        facts.append(("peak RSS", f"{t.memory.peak_rss_mb:.0f} MB{base}"))
    if t.input_shapes:
        facts.append(("input shapes", _e(", ".join(f"{k} {_shape(v)}"
                                                   for k, v in t.input_shapes.items()))))
    if t.artifacts:
        facts.append(("artifacts", "<br>".join(f"<code>{_e(a.path)}</code> "
                                               f"({_fmt_bytes(a.bytes)})" for a in t.artifacts)))
    if t.log:
        facts.append(("log", f"<code>{_e(t.log)}</code>"))
    if t.timings:
        facts.append(("stages", _e(", ".join(f"{k} {v:.2f} s" for k, v in t.timings.items()
                                             if isinstance(v, (int, float))))))
    return _kv(facts)


METRIC_COLUMNS = (("max_abs", "max abs", ".2e"), ("mean_abs", "mean abs", ".2e"),
                  ("max_rel", "max rel", ".2e"), ("rmse", "RMSE", ".2e"),
                  ("cosine", "cosine", ".6f"), ("snr_db", "SNR dB", ".1f"))


def _numerics(t: TargetReport, plots: _Plots) -> str:
    n = t.numerics
    assert n is not None
    tolerances = {_tolerance(m.get("tolerance") or {}) for m in n.outputs.values()}
    shared = tolerances.pop() if len(tolerances) == 1 else None  # the same for every output
    has_top = any(m.get("top1_agreement") is not None for m in n.outputs.values())
    rows = []
    for out, m in n.outputs.items():
        snr = ("exact" if m.get("snr_db") is None and m.get("max_abs") == 0 else
               _num(m.get("snr_db"), ".1f"))
        cells = [f"<code>{_e(out)}</code>", _pill("passed" if m.get("passed") else "failed"),
                 *(_num(m.get(k), f) for k, _, f in METRIC_COLUMNS[:-1]), snr]
        if has_top:
            cells.append(f"{m['top1_agreement']:.1%} / {m.get('top5_agreement', 0):.1%}"
                         if m.get("top1_agreement") is not None else "-")
        if shared is None:
            cells.append(_e(_tolerance(m.get("tolerance") or {})))
        cells.append(_e(m.get("reason") or ""))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in (
        "output", "verdict", *(c for _, c, _ in METRIC_COLUMNS),
        *(["top-1 / top-5"] if has_top else []), *(["tolerance"] if shared is None else []),
        "reason"))
    tol_note = f" Tolerance of every output: {_e(shared)}." if shared else ""
    parts = [f'<h3>Numerics</h3><p class="dim">Against the reference, computed by '
             f"{_e(n.runtime)}.{tol_note}</p>"
             f'<div class="scroll"><table class="metrics"><thead><tr>{head}</tr></thead>'
             f"<tbody>{''.join(rows)}</tbody></table></div>"]
    measured = {k: m for k, m in n.outputs.items() if "max_abs" in m}
    if measured:
        shown = _most_telling(measured, MAX_BARS)
        parts.append("<h4>Metrics against the tolerances</h4>"
                     + plots.draw(_metric_figure, shown, alt=f"metrics of {t.name} per output")
                     + _more(len(measured) - len(shown)))
        parts.append(_histograms(t.name, measured, plots))
    if n.vs_fp32:
        parts.append(_vs_fp32(t))
    if t.sparsity:
        from mtconvert.render import target_sparsity_line

        parts.append(f"<h4>Sparsity</h4><p>{_e(target_sparsity_line(t.sparsity))}</p>")
    if (t.compressed or {}).get("vs_float"):
        from mtconvert.render import vs_float_line

        parts.append(f"<h4>Against the float model</h4><p>"
                     f"{_e(vs_float_line(t.compressed['vs_float']))}</p>")
    return "".join(parts)


def _histograms(name: str, measured: dict[str, dict[str, Any]], plots: _Plots) -> str:
    with_hist = {k: m for k, m in measured.items() if m.get("abs_error_histogram")}
    head = "<h4>Distribution of |target − reference|</h4>"
    if not with_hist:
        return head + '<p class="dim">No error histograms in this report (an older one).</p>'
    plotted = {k: m for k, m in with_hist.items() if m["abs_error_histogram"]["counts"]}
    exact = [k for k, m in with_hist.items() if not m["abs_error_histogram"]["counts"]
             and not m["abs_error_histogram"].get("nonfinite")]
    note = (f'<p class="dim">Exactly equal to the reference, every value: '
            f"{_e(', '.join(exact))}.</p>" if exact else "")
    if not plotted:
        return head + note
    shown = _most_telling(plotted, MAX_HISTOGRAMS)
    return (head + plots.draw(_histogram_figure, shown, alt=f"error histograms of {name}")
            + '<p class="dim">Values per log-spaced bin of the absolute error; the dashed '
            "line is the absolute tolerance (an element passes within atol + rtol·|reference|)"
            "; exact matches and NaN/Inf, which a log axis cannot show, are counted above "
            "each plot on the right.</p>"
            + _more(len(plotted) - len(shown)) + note)


def _vs_fp32(t: TargetReport) -> str:
    n = t.numerics
    assert n is not None and n.vs_fp32 is not None
    fp32 = n.fp32_worst or {}
    rows = "".join(
        f"<tr><td><code>{_e(out)}</code></td>"
        + "".join(f"<td>{_num(m.get(k), f)}</td>" for k, _, f in METRIC_COLUMNS) + "</tr>"
        for out, m in n.vs_fp32.items())
    head = "".join(f"<th>{c}</th>" for _, c, _ in METRIC_COLUMNS)
    yardstick = (f"the fp32 artifact could not run: {_e(fp32['error'])}" if "error" in fp32 else
                 f"the fp32 artifact against the reference: max abs "
                 f"{_num(fp32.get('max_abs'), '.2e')}, cosine {_num(fp32.get('cosine'), '.6f')}")
    return (f"<h4>{_e(t.precision)} against the same model's fp32 artifact</h4>"
            f'<p class="dim">{yardstick}</p><table><thead><tr><th>output</th>{head}</tr>'
            f"</thead><tbody>{rows}</tbody></table>")


def _sweep(t: TargetReport) -> str:
    rows = []
    for e in t.sweep:
        worst = e.get("worst") or {}
        shapes = ", ".join(f"{k} {_shape(v)}" for k, v in (e.get("input_shapes") or {}).items())
        rows.append(f"<tr><td>{_e(shapes)}</td><td>{_pill(e.get('status', 'skipped'))}</td>"
                    f"<td>{_e(worst.get('output', '-'))}</td>"
                    f"<td>{_num(worst.get('max_abs'), '.2e')}</td>"
                    f"<td>{_num(worst.get('cosine'), '.6f')}</td>"
                    f"<td>{_e(e.get('reason') or '')}</td></tr>")
    ok = sum(e.get("status") == "passed" for e in t.sweep)
    return (f"<h3>Shape sweep</h3><p>{ok}/{len(t.sweep)} extra shapes passed.</p><table><thead>"
            "<tr><th>input shapes</th><th>status</th><th>worst output</th><th>max abs</th>"
            f"<th>cosine</th><th>reason</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _localization(d: dict[str, Any]) -> str:
    first = d.get("first_divergence")
    parts = ["<h3>Localization</h3>"]
    if first:
        target = (f" (in the target: {_e(first.get('target_op_type'))} "
                  f"<code>{_e(first['target'])}</code>)" if first.get("target") else "")
        parts.append(f'<p class="headline">First divergence: {_e(first.get("op_type"))} '
                     f"<code>{_e(first.get('node'))}</code>{target}, max abs "
                     f"{_num(first.get('max_abs'), '.3g')}, cosine "
                     f"{_num(first.get('cosine'), '.6f')}</p>")
    elif "result" in d:
        parts.append(f'<p class="headline">{_e(d["result"])}</p>')
    nonfinite = d.get("first_nonfinite_op")
    if isinstance(nonfinite, dict):
        parts.append(f'<p class="headline">First op producing '
                     f"{'Inf' if nonfinite.get('inf') else 'NaN'}: "
                     f"{_e(nonfinite.get('op_type'))} <code>{_e(nonfinite.get('op'))}</code> "
                     f"({_e(nonfinite.get('dtype'))})</p>")
    shown = {"first_divergence", "result", "history", "first_nonfinite_op",  # above
             "node", "op_type", "max_abs", "cosine", "target", "target_op_type"}
    rows = [(_e(k), _e(_plain(v))) for k, v in [*(first or {}).items(), *d.items()]
            if k not in shown and v not in (None, "", [], {})]
    parts.append(_kv(rows))
    history = d.get("history")
    if isinstance(history, list) and history:
        keys = list(dict.fromkeys(k for h in history if isinstance(h, dict) for k in h))
        head = "".join(f"<th>{_e(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{_e(_plain(h.get(k, '')))}</td>" for k in keys)
                       + "</tr>" for h in history if isinstance(h, dict))
        parts.append(f"<h4>Probes</h4><table><thead><tr>{head}</tr></thead>"
                     f"<tbody>{body}</tbody></table>")
    return "".join(parts)


def _conversion(t: TargetReport) -> str:
    c = t.conversion
    assert c is not None
    versions = ", ".join(f"{k} {v}" for k, v in c.tool_versions.items())
    steps = "".join(f"<li>{_e(s)}</li>" for s in c.steps)
    return (f"<h3>Conversion</h3><p>{c.seconds:.1f} s"
            f"{' (reused from the cache)' if c.cached else ''}"
            f"{'; tools: ' + _e(versions) if versions else ''}</p>"
            + (f'<ol class="steps">{steps}</ol>' if steps else ""))


SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def _findings(t: TargetReport) -> str:
    rows = "".join(
        f'<tr class="f-{_e(f.get("severity"))}"><td>{_e(f.get("severity"))}</td>'
        f"<td><code>{_e(f.get('code'))}</code></td><td>{_e(f.get('message'))}</td></tr>"
        for f in sorted(t.findings, key=lambda f: SEVERITY_ORDER.get(f.get("severity"), 3)))
    return (f"<h3>Findings</h3><table><thead><tr><th>severity</th><th>code</th><th>message</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>")


# ---------------------------------------------------------------- plots

class _Plots:
    """matplotlib figures as ``<img>`` elements with SVG data URIs (no pyplot, no global
    backend switch: the caller's matplotlib state is left alone)."""

    RC = {"svg.fonttype": "path", "svg.hashsalt": "mtconvert", "font.size": 9.0,
          "axes.titlesize": 9.5, "axes.spines.top": False, "axes.spines.right": False,
          "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6,
          "axes.axisbelow": True, "legend.fontsize": 8.0, "legend.frameon": False}

    def __init__(self) -> None:
        try:
            import matplotlib  # noqa: F401
            self.missing = None
        except ImportError:
            self.missing = ("plots need matplotlib, which is not installed: "
                            "pip install 'mtconvert[html]'")

    def draw(self, plot: Any, data: Any, *, alt: str) -> str:
        """``plot(data, figure_factory)`` draws onto a figure it makes; returns the <img>."""
        if self.missing:
            return f'<p class="noplot">{_e(self.missing)}</p>'
        import matplotlib
        from matplotlib.figure import Figure

        with matplotlib.rc_context(self.RC):
            made: list[Figure] = []

            def figure(height: float, width: float = FIG_WIDTH) -> Figure:
                made.append(Figure(figsize=(width, height), layout="constrained"))
                return made[-1]

            plot(data, figure)
            buf = io.BytesIO()
            made[-1].savefig(buf, format="svg", metadata={"Date": None})
        w, h = (round(x * 96) for x in made[-1].get_size_inches())
        uri = "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img class="plot" alt="{_e(alt)}" width="{w}" height="{h}" src="{uri}">'


def _latency_figure(rows: list[tuple[str, str, Latency]], figure: Any) -> None:
    fig = figure(0.9 + 0.55 * len(rows))
    ax = fig.add_subplot()
    values = [list(lat.samples_ms) or [lat.p50_ms, lat.p90_ms, lat.p99_ms] for _, _, lat in rows]
    lo = min(min(v) for v in values)
    hi = max(max(v) for v in values)
    if lo > 0 and hi / lo > 20:
        ax.set_xscale("log")
    y = list(range(len(rows)))[::-1]
    box = ax.boxplot(values, positions=y, orientation="horizontal", whis=(5, 95),
                     showfliers=False, widths=0.5, patch_artist=True,
                     medianprops={"color": "black", "linewidth": 1.5})
    jitter = _jitter()
    for (label, color, lat), pos, v, patch in zip(rows, y, values, box["boxes"], strict=True):
        patch.set(facecolor=color, alpha=0.18, edgecolor=color)
        ax.scatter(v, [pos + jitter(i) for i in range(len(v))], s=9, color=color, alpha=0.75,
                   linewidths=0, zorder=3)
        ax.annotate(f"p50 {lat.p50_ms:.3g} ms", (1.0, pos), xycoords=("axes fraction", "data"),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8.5)
    ax.set_yticks(y, [_mt(_short(label, 40)) for label, _, _ in rows])
    ax.set_xlabel("milliseconds per run" + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.grid(axis="y", visible=False)


def _jitter() -> Any:
    """Deterministic vertical spread for the dots (no random state: same report, same SVG)."""
    return lambda i: ((i * 0.618034) % 1.0 - 0.5) * 0.36


# (key, title, tolerance key, higher is better, log scale, judged by that tolerance)
BAR_PANELS = (("max_abs", "max abs error", "atol", False, True, True),
              ("mean_abs", "mean abs error (atol for scale)", "atol", False, True, False),
              ("one_minus_cosine", "1 − cosine", "max_one_minus_cosine", False, True, True),
              ("snr_db", "SNR (dB)", "min_snr_db", True, False, True))


def _metric_figure(outputs: dict[str, dict[str, Any]], figure: Any) -> None:
    names = list(outputs)
    fig = figure(1.3 + 0.32 * len(names))
    axes = fig.subplots(1, len(BAR_PANELS), sharey=True)
    y = list(range(len(names)))[::-1]
    for ax, (key, title, tol_key, higher, log, judged) in zip(axes, BAR_PANELS, strict=True):
        values = [_bar_value(outputs[n], key) for n in names]
        bounds = [_bar_bound(outputs[n].get("tolerance") or {}, tol_key) for n in names]
        _bar_panel(ax, y, values, bounds, higher, log, judged)
        ax.set_title(title + (" (higher is better)" if higher else ""), loc="left")
    axes[0].set_yticks(y, [_mt(_short(n)) for n in names])
    axes[0].set_ylim(-0.6, len(names) - 0.4)
    handles = [_legend_patch(COLORS["passed"], "within its tolerance"),
               _legend_patch(COLORS["failed"], "beyond it"),
               _legend_patch(COLORS["none"], "not judged by a tolerance")]
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="black", linestyle="--", label="tolerance"))
    fig.legend(handles=handles, loc="outside lower center", ncols=4)


def _bar_value(m: dict[str, Any], key: str) -> float | None:
    if key == "snr_db" and m.get("snr_db") is None and m.get("max_abs") == 0:
        return math.inf  # exact: no noise
    if key == "one_minus_cosine":  # an exact match is 0, whatever the float rounding says
        return (None if m.get("cosine") is None else
                0.0 if m.get("max_abs") == 0 else max(0.0, 1.0 - m["cosine"]))
    return m.get(key)


def _bar_bound(tol: dict[str, Any], key: str) -> float | None:
    if key == "max_one_minus_cosine":
        return None if tol.get("min_cosine") is None else 1.0 - tol["min_cosine"]
    return tol.get(key)


def _bar_panel(ax: Any, y: list[int], values: list[float | None], bounds: list[float | None],
               higher: bool, log: bool, judged: bool = True) -> None:
    finite = [v for v in values + bounds
              if v is not None and math.isfinite(v) and (v > 0 or not log)]
    if log:
        ax.set_xscale("log")
        lo = min(finite) / 8 if finite else 1e-9
        hi = max(finite) * 8 if finite else 1.0
    else:
        lo = min([0.0, *finite]) * 1.15
        hi = max([1.0, *finite]) * 1.15
    ax.set_xlim(lo, hi)
    for pos, v, b in zip(y, values, bounds, strict=True):
        ok = None if b is None or v is None or not judged else (v >= b if higher else v <= b)
        color = COLORS["none" if ok is None else "passed" if ok else "failed"]
        if v is None or (log and v <= 0) or math.isinf(v):
            exact = "exact (0)" if v == 0 else "exact (∞)" if v == math.inf else None
            ax.text(0.02, pos, exact or "n/a", va="center", fontsize=8,
                    transform=ax.get_yaxis_transform(),
                    color=COLORS["passed"] if exact else COLORS["none"])
        else:
            left = lo if log else 0.0
            ax.barh(pos, v - left, left=left, height=0.62, color=color, alpha=0.85)
            ax.annotate(f"{v:.3g}", (v, pos), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7.5)
        if b is not None:
            ax.vlines(b, pos - 0.42, pos + 0.42, colors="black" if judged else "#8c959f",
                      linestyles="--", linewidth=1.1)
    if log:
        _log_ticks(ax)
    ax.grid(axis="y", visible=False)
    ax.tick_params(axis="y", length=0)


def _log_ticks(ax: Any) -> None:
    """At most about five labelled decades on a log x axis, no labels on minor ticks."""
    from matplotlib.ticker import LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, numticks=6))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _legend_patch(color: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=color, alpha=0.85, label=label)


def _histogram_figure(outputs: dict[str, dict[str, Any]], figure: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    names = list(outputs)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = figure(2.3 * rows + 0.2, min(FIG_WIDTH, 0.6 + 3.3 * cols))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        m = outputs[name]
        h = m["abs_error_histogram"]
        color = COLORS["passed" if m.get("passed") else "failed"]
        ax.stairs(h["counts"], h["edges"], fill=True, color=color, alpha=0.8)
        ax.set_xscale("log")
        atol = (m.get("tolerance") or {}).get("atol")
        if atol:
            ax.axvline(atol, color="black", linestyle="--", linewidth=1.1)
            ax.annotate(f"atol {atol:g}", (atol, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -10), textcoords="offset points", fontsize=8)
        edges = h["edges"]
        left, right = edges[0] / 1.6, edges[-1] * 1.6
        if atol:
            left, right = min(left, atol / 3), max(right, atol * 3)
        ax.set_xlim(left, right)
        _log_ticks(ax)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        extra = [f"{h['zero']} exact" if h.get("zero") else "",
                 f"{h['nonfinite']} NaN/Inf" if h.get("nonfinite") else ""]
        ax.set_title(_mt(_short(name, 30)), loc="left")
        if any(extra):
            ax.set_title("+ " + ", ".join(x for x in extra if x), loc="right", fontsize=8,
                         color="#59636e")
        ax.set_xlabel("|target − reference|")
        ax.set_ylabel("values")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)


# ---------------------------------------------------------------- helpers

def _e(x: Any) -> str:
    """Escaped for HTML text and attribute values."""
    return escape("" if x is None else str(x), quote=True)


def _mt(text: str) -> str:
    """A report string as matplotlib text: literally, never as mathtext."""
    return text.replace("$", r"\$")


def _short(name: str, n: int = 32) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _plain(v: Any) -> str:
    if isinstance(v, float):
        return format(v, ".4g")
    if isinstance(v, (list, tuple)):
        return ", ".join(_plain(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return str(v)


def _shape(shape: Any) -> str:
    return "x".join(map(str, shape)) if isinstance(shape, (list, tuple)) else str(shape or "-")


def _tolerance(tol: dict[str, Any]) -> str:
    names = {"atol": "atol", "rtol": "rtol", "min_cosine": "cos\u00a0≥",
             "min_snr_db": "SNR\u00a0≥"}
    return ", ".join(f"{label}\u00a0{tol[k]:g}" for k, label in names.items()
                     if tol.get(k) is not None) or "-"


def _pill(status: str) -> str:
    return f'<span class="pill s-{_e(status)}">{_e(status)}</span>'


def _kv(rows: list[tuple[str, str]]) -> str:
    """A two-column fact table; both sides are HTML already escaped by the caller."""
    if not rows:
        return ""
    return ('<table class="kv"><tbody>' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>"
                                                 for k, v in rows) + "</tbody></table>")


def _more(n: int) -> str:
    return f'<p class="dim">{n} more output(s) in the table above.</p>' if n > 0 else ""


def _most_telling(outputs: dict[str, dict[str, Any]], n: int) -> dict[str, dict[str, Any]]:
    """All outputs in report order when they fit; else the failing ones and the largest
    errors first."""
    if len(outputs) <= n:
        return outputs
    ranked = sorted(outputs, key=lambda k: (bool(outputs[k].get("passed")),
                                            -(outputs[k].get("max_abs") or 0.0)))
    return {k: outputs[k] for k in ranked[:n]}


STYLE = """
:root { --fg: #1f2328; --dim: #59636e; --line: #d1d9e0; --bg-soft: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.45;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 24px; margin: 0 0 8px; }
h2 { font-size: 19px; margin: 0 0 10px; display: flex; gap: 10px; align-items: center; }
h3 { font-size: 15px; margin: 22px 0 6px; }
h4 { font-size: 13.5px; margin: 16px 0 4px; color: var(--dim); }
section { border-top: 1px solid var(--line); padding-top: 18px; margin-top: 26px; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px 4px 0; text-align: left;
  vertical-align: top; }
thead th { font-weight: 600; border-bottom: 2px solid var(--line); white-space: nowrap; }
table.summary td:nth-child(n+4), table.summary th:nth-child(n+4) { text-align: right;
  font-variant-numeric: tabular-nums; padding-left: 14px; }
table.kv th { color: var(--dim); font-weight: 500; white-space: nowrap; padding-right: 18px; }
table.kv td, table.kv th { border-bottom: none; padding-top: 2px; padding-bottom: 2px; }
td { font-variant-numeric: tabular-nums; }
table.metrics td { white-space: nowrap; }
table.metrics td:last-child, table.metrics td:first-child { white-space: normal;
  min-width: 10em; }
.scroll { overflow-x: auto; }
.dim { color: var(--dim); font-weight: normal; font-size: 0.92em; }
.pill { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 12px;
  font-weight: 600; color: #fff; white-space: nowrap; }
.s-passed { background: #1a7f37; } .s-failed { background: #cf222e; }
.s-error { background: #8250df; } .s-skipped { background: #9a6700; }
.verdict { font-size: 20px; font-weight: 700; margin: 4px 0 12px; }
.verdict span { font-size: 14px; font-weight: normal; color: var(--dim); margin-left: 8px; }
.v-passed { color: #1a7f37; } .v-failed { color: #cf222e; }
.reason { border-left: 4px solid; padding: 6px 12px; background: var(--bg-soft);
  overflow-wrap: anywhere; }
.r-failed { border-color: #cf222e; } .r-error { border-color: #8250df; }
.r-skipped { border-color: #9a6700; } .r-passed { border-color: #1a7f37; }
.headline { font-weight: 600; }
img.plot { display: block; max-width: 100%; height: auto; margin: 6px 0; }
.noplot { border: 1px dashed var(--line); padding: 10px; color: var(--dim); }
ol.steps { margin: 4px 0; padding-left: 24px; font-size: 13px; }
ol.steps li { overflow-wrap: anywhere; }
tr.f-error td:first-child { color: #cf222e; font-weight: 600; }
tr.f-warning td:first-child { color: #9a6700; font-weight: 600; }
tr.f-info td:first-child { color: var(--dim); }
footer { margin-top: 36px; color: var(--dim); font-size: 12px; }
"""
