"""Report renderers, a registry: each format is one module with ``render(report, destination)``
(a path, or a text stream) and one line here. The CLI's ``--report-<format> PATH`` options and
the API come from this table; the console renderer always runs.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mtconvert.backends.options import Option

if TYPE_CHECKING:
    from mtconvert.report import Report

ALL = ("convert", "validate", "verify")


@dataclass(frozen=True)
class Renderer:
    name: str
    module: str  # has render(report, destination)
    option: Option | None = None  # the option naming its file; None: rendered to the terminal


RENDERERS: dict[str, Renderer] = {r.name: r for r in (
    Renderer("console", "mtconvert.render.console"),
    Renderer("json", "mtconvert.render.json",
             Option("report_json", "path", None, "Write the JSON report here.", modes=ALL)),
    Renderer("html", "mtconvert.render.html",
             Option("report_html", "path", None, "Write a self-contained HTML report here "
                    "(tables and plots, nothing fetched).", modes=ALL, flag="--html")),
    Renderer("junit", "mtconvert.render.junit",
             Option("report_junit", "path", None, "Write JUnit XML here: a testcase per target "
                    "and check, for CI test views.", modes=ALL, flag="--junit")),
    Renderer("markdown", "mtconvert.render.markdown",
             Option("report_markdown", "path", None, "Write a Markdown summary here (a "
                    "pull-request comment), with deployment snippets.", modes=ALL,
                    flag="--markdown")),
)}


# A MatrixReport (mtconvert matrix) has renderers of its own, behind the same options.
MATRIX_RENDERERS: dict[str, Renderer] = {r.name: r for r in (
    Renderer("console", "mtconvert.render.matrix_console"),
    Renderer("json", "mtconvert.render.matrix_json", RENDERERS["json"].option),
    Renderer("html", "mtconvert.render.matrix_html", replace(
        RENDERERS["html"].option, help="Write the grid as one self-contained HTML page here.")),
    Renderer("junit", "mtconvert.render.matrix_junit", replace(
        RENDERERS["junit"].option, help="Write JUnit XML here: a testsuite per model, a "
        "testcase per cell.")),
    Renderer("markdown", "mtconvert.render.matrix_markdown", replace(
        RENDERERS["markdown"].option, help="Write the grid and why each cell did not pass "
        "as Markdown here.")),
)}


def options(mode: str) -> list[Option]:
    if mode == "matrix":
        return [r.option for r in MATRIX_RENDERERS.values() if r.option]
    return [r.option for r in RENDERERS.values() if r.option and mode in r.option.modes]


def _table(report: Any) -> dict[str, Renderer]:
    """The renderers for this kind of report."""
    from mtconvert.matrix_report import MatrixReport

    return MATRIX_RENDERERS if isinstance(report, MatrixReport) else RENDERERS


def render(name: str, report: Report, destination: Path | IO[str] | Any) -> None:
    """Render ``report`` with the named renderer into ``destination``."""
    module = importlib.import_module(_table(report)[name].module)
    module.render(report, destination)


def write_files(report: Report, paths: dict[str, Path | None]) -> None:
    """Every file renderer whose option (``report_json`` ...) names a path."""
    for r in _table(report).values():
        if r.option is not None and paths.get(r.option.name) is not None:
            render(r.name, report, Path(paths[r.option.name]))


def ratio_text(ratio: tuple[float, bool] | None) -> str:
    """``0.92x``; ``0.92x?`` when the interleaved timing was too noisy to tell; ``-``."""
    if ratio is None:
        return "-"
    return f"{ratio[0]:.2f}x" + ("?" if ratio[1] else "")


PROFILE_ROWS = 5  # operators each renderer lists of a --profile (the JSON keeps them all)


def profile_headline(profile: dict[str, Any]) -> str:
    """One line on a --profile entry: what measured it and the operator types' shares, or why
    there are no figures."""
    if "unavailable" in profile:
        return f"operator profile: not available ({profile['unavailable']})"
    if "error" in profile:
        return f"operator profile: failed ({profile['error']})"
    types = ", ".join(f"{t['op_type']} {t['share']:.0%}" for t in profile["op_types"][:6])
    return (f"operator profile ({profile.get('runtime', '')}, median of {profile['runs']} runs, "
            f"{profile['operators']} operators, {profile['total_ms']:.2f} ms in all): {types}")


def generation_headline(g: dict[str, Any]) -> str:
    """One line on a target's generation (generative models): tokens agreed, the first
    mismatch, the teacher-forced logits, per-token latency; or why it was not judged."""
    if "steps" not in g:
        return f"generation not judged: {g.get('skipped') or g.get('error')}"
    line = f"{g['tokens_agree']:.0%} of {g['steps']} greedy tokens agree"
    if g["first_mismatch_step"] is not None:
        line += f", first mismatch at step {g['first_mismatch_step']}" + (
            " (a near-tie in the reference)" if g.get("first_mismatch_is_tie") else "")
    tf = g["teacher_forced"]
    line += (f"; teacher-forced logits max abs {tf['max_abs']:.2e} "
             f"({'within' if tf['passed'] else 'outside'} tolerance)")
    if "decode_ms_p50" in g:
        line += (f"; time to first token {g['time_to_first_token_ms']:.2f} ms, decode p50 "
                 f"{g['decode_ms_p50']:.2f} / p90 {g['decode_ms_p90']:.2f} ms/token")
    return line + f"; KV cache {g['kv_cache_bytes']} bytes at {g['max_cache']} slots" \
        + kv_cache_place(g)


def kv_cache_place(g: dict[str, Any]) -> str:
    """Where the cache lives when the runtime holds it (Core ML state); "" for the host."""
    kept = g.get("kv_cache") or {}
    return (f", held in the runtime's state ({kept['states']} {kept['dtype']} states)"
            if kept.get("kept_in") == "runtime state" else "")


def generation_differences(g: dict[str, Any]) -> list[tuple[int, int, int | None]]:
    """(step, reference token, target token) wherever the generated ids differ."""
    ref, got = g.get("reference_tokens") or [], g.get("target_tokens") or []
    return [(i, r, got[i] if i < len(got) else None) for i, r in enumerate(ref)
            if i >= len(got) or got[i] != r]


def vs_float_line(v: dict[str, Any]) -> str:
    """--float-model: the target's and the compressed source's distance from the float model."""
    if "error" in v:
        return f"vs the float model: {v['error']}"

    def worst(w: dict[str, Any] | None) -> str:
        w = w or {}
        return f"max abs {_fmt(w.get('max_abs'), '.2e')}, cosine {_fmt(w.get('cosine'), '.6f')}"

    def _fmt(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    src, acc = v.get("source") or {}, v.get("accuracy") or {}
    line = (f"vs the float model ({v['profile']} profile): {worst(v.get('worst'))} "
            f"({'within' if v.get('passed') else 'OUTSIDE'} the {v['profile']} bounds); the "
            f"compressed source: {worst(src.get('worst'))}")
    if "drop_points" in acc:
        line += (f"; {acc['metric']} {acc['target']:.4g} vs the float model's "
                 f"{acc['float']:.4g} ({-acc['drop_points']:+.2f} points, {acc['items']} items)")
    elif acc:
        line += f"; accuracy vs the float model: {acc.get('unavailable') or acc.get('error')}"
    return line


def sparsity_line(s: dict[str, Any]) -> str:
    """A pruned source's weights in one line (SourceInfo.sparsity)."""
    kind = "structured" if s["structured"] else "unstructured"
    lines = (f", {s['zero_rows']} zero rows, {s['zero_columns']} zero columns"
             if s["zero_rows"] or s["zero_columns"] else "")
    return (f"pruned: {s['zero_share']:.1%} of the weights are exactly zero ({kind}; "
            f"{s['pruned_tensors']} of {s['weight_tensors']} weight tensors at "
            f"{s['pruned_zero_share']:.1%}{lines})")


def target_sparsity_line(s: dict[str, Any]) -> str:
    """Whether a target's artifact kept the source's zeros (TargetReport.sparsity)."""
    got = s.get("artifact") or {}
    stored = _storage(s)
    if "artifact" not in s:  # --sparse on a source without pruned weights (sparsity.unpruned)
        return f"sparsity: {stored.removeprefix('; ')}"
    if "unread" in got or "error" in got:
        return f"sparsity: not measured ({got.get('unread') or got.get('error')}){stored}"
    return (f"sparsity {'kept' if s['kept'] else 'LOST'}: {s['artifact_zero_share']:.1%} of "
            f"the artifact's weights are zero (source {s['source_zero_share']:.1%}){stored}")


def _storage(s: dict[str, Any]) -> str:
    """How the artifact stores the zeros (--sparse), as a clause of the sparsity line."""
    if s.get("storage") == "sparse":
        note = f": {s['storage_note']}" if s.get("storage_note") else ""
        return f"; stored sparse ({s['sparse_tensors']} weights){note}"
    if s.get("storage") == "dense":
        return f"; stored dense: {s['storage_note']}"
    return ""


def float_fallback_line(f: dict[str, Any]) -> str:
    """The int8 float fallback (TargetReport.float_fallback) in one line."""
    if not f.get("applied"):
        return f"int8 float fallback: not run ({f.get('reason')})"
    kept, n = f.get("kept") or [], f.get("weight_layers")
    last = (f.get("rounds") or [{}])[-1].get("worst") or {}
    how = (f"cosine {last['cosine']:.6f}" if isinstance(last.get("cosine"), float) else
           (f.get("rounds") or [{}])[-1].get("reason") or "")
    verdict = "passes" if f.get("passed") else "still fails"
    return (f"int8 with {len(kept)} of {n} weight layers kept in float {verdict} ({how}, "
            f"{len(f.get('rounds') or ())} round(s)): {', '.join(kept) or 'none'}")


def quant_error_lines(q: dict[str, Any]) -> list[str]:
    """A failing int8 artifact's worst layers (diagnostics.quantization_error), one line each."""
    if "unavailable" in q:
        return [f"per-layer quantization error: not measured ({q['unavailable']})"]
    head = (f"layers adding the most quantization error (of {q['weight_layers']} weight layers; "
            "keep these in float first):")
    return [head, *(f"{e['op_type']} {e['node']}: adds {e['added']:.2%} relative error "
                    f"(output {e['relative_error']:.2%})" for e in q["layers"])]


def emit(destination: Path | IO[str] | str, text: str) -> None:
    """A renderer's text to a file (written atomically) or to a text stream."""
    if isinstance(destination, (str, Path)):
        write_atomic(Path(destination), text)
    else:
        destination.write(text)


def emit_bytes(destination: Path | IO[Any] | str, data: bytes) -> None:
    """Encoded output (an XML file) to a file (atomically), a binary stream, or a text stream
    (through its buffer when it has one)."""
    if isinstance(destination, (str, Path)):
        path = Path(destination)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    elif hasattr(destination, "buffer"):
        destination.flush()
        destination.buffer.write(data)
    else:
        try:
            destination.write(data)
        except TypeError:
            destination.write(data.decode())


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
