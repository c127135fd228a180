"""Markdown for a pull-request comment: the verdict, one compact table row per target, each
failing target's reason, and per target a collapsed ``<details>`` block with its deployment
snippets (TargetReport.snippets). A function of the Report alone."""
from __future__ import annotations

import re
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mtconvert.render import ratio_text
from mtconvert.render.console import _fmt_bytes

if TYPE_CHECKING:
    from mtconvert.report import Report, TargetReport

_STATUS = {"passed": "✅ passed", "failed": "❌ failed", "error": "💥 error",
           "skipped": "⏭️ skipped"}
_LANGUAGES = {"kotlin": "Kotlin", "swift": "Swift", "cpp": "C++", "python": "Python"}
_REASON_CHARS = 600  # a comment stays readable; the JSON report holds the whole text


def render(report: Report, destination: Path | IO[str]) -> None:
    """To a file (written atomically) or a text stream."""
    from mtconvert.render import emit

    emit(destination, to_markdown(report))


def to_markdown(report: Report) -> str:
    targets = list(report.targets.values())
    passed = sum(t.status == "passed" for t in targets)
    verdict = "✅ PASSED" if report.ok else "❌ FAILED"
    lines = [f"### mtconvert: {verdict} — {passed}/{len(targets)} targets passed "
             f"(exit code {report.exit_code})", "", _source_line(report), ""]
    ref = report.reference
    ref_p50 = ref.latency.p50_ms if ref and ref.latency else None
    accuracy = any(_accuracy(t) is not None for t in targets)
    header = ["target", "status", "worst error", "cosine", "p50 ms (vs ref)", "size"]
    header += ["accuracy"] if accuracy else []
    generation = any(t.generation for t in targets)
    header += ["greedy tokens agree", "decode ms/token p50"] if generation else []
    lines += ["| " + " | ".join(header) + " |",
              "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(_row(t, ref_p50, accuracy) + (_generation(t) if generation
                                                               else [])) + " |"
              for t in targets]
    failing = [t for t in targets if t.status != "passed"]
    if failing:
        lines += ["", "**Why not passed**", ""]
        lines += [item for t in failing for item in _why(t)]
    lines += _profiles(report)
    lines += _vs_float(targets)
    lines += _sparsity(targets)
    lines += _float_fallbacks(targets)
    for t in targets:
        lines += _snippets(t)
    return "\n".join(lines).rstrip() + "\n"


def _profiles(report: Report) -> list[str]:
    """--profile: per target (and the reference) the headline and the slowest operators."""
    from mtconvert.render import PROFILE_ROWS, profile_headline

    who = ([("reference", report.reference.profile)] if report.reference else []) + [
        (t.name, t.profile) for t in report.targets.values()]
    lines: list[str] = []
    for name, prof in who:
        if not prof:
            continue
        lines += ["", f"**{_esc(name)}** {_esc(profile_headline(prof))}", ""]
        if prof.get("ops"):
            lines += ["| ms | share | op type | operator |", "|---:|---:|---|---|"]
            lines += [f"| {op['ms']:.3f} | {op['share']:.1%} | {_esc(op['op_type'])} | "
                      f"`{_one_line(op['name'])}` |" for op in prof["ops"][:PROFILE_ROWS]]
    return (["", "**Where the time goes** (`--profile`)"] + lines) if lines else []


def _source_line(report: Report) -> str:
    src = report.source
    name = Path(src.path).name if src.path else "in-memory module"
    parts = [f"Source `{name}` ({src.format}"
             + (f", sha256 `{src.sha256[:12]}`" if src.sha256 else "") + ")"]
    if src.input_shapes:
        parts.append("inputs " + ", ".join(f"`{k}` {'x'.join(map(str, v))}"
                                           for k, v in src.input_shapes.items()))
    if src.sparsity:
        from mtconvert.render import sparsity_line

        parts.append(_esc(sparsity_line(src.sparsity)))
    ref = report.reference
    if ref:
        p50 = f", p50 {ref.latency.p50_ms:.2f} ms" if ref.latency else ""
        parts.append(f"reference {_esc(ref.runtime)} {ref.version or ''}".rstrip() + p50)
    return " · ".join(parts)


def _row(t: TargetReport, ref_p50: float | None, accuracy: bool) -> list[str]:
    worst = (t.numerics.worst or {}) if t.numerics else {}
    error = (f"{worst['max_abs']:.2e} (`{worst.get('output')}`)"
             if worst.get("max_abs") is not None else "–")
    cosine = f"{worst['cosine']:.6f}" if worst.get("cosine") is not None else "–"
    if t.latency is not None:
        p50 = f"{t.latency.p50_ms:.2f}"
        ratio = t.ratio_to_reference(ref_p50)
        p50 += f" ({ratio_text(ratio)})" if ratio else ""
    else:
        p50 = "–"
    size = _fmt_bytes(sum(a.bytes for a in t.artifacts)) if t.artifacts else "–"
    row = [f"{_esc(t.name)} {t.precision}", _STATUS[t.status], error, cosine, p50, size]
    if accuracy:
        acc = _accuracy(t)
        row.append("–" if acc is None else _esc(str(acc)))
    return row


def _generation(t: TargetReport) -> list[str]:
    """The generation columns: tokens agreed of the steps, per-token decode p50."""
    g = t.generation or {}
    if "steps" not in g:
        return ["–", "–"]
    agreed = round(g["tokens_agree"] * g["steps"])
    tie = " (tie)" if g.get("first_mismatch_is_tie") else ""
    p50 = g.get("decode_ms_p50")
    return [f"{agreed}/{g['steps']}{tie}", "–" if p50 is None else f"{p50:.2f}"]


def _vs_float(targets: list[TargetReport]) -> list[str]:
    """--float-model: each target against the compressed source's float original."""
    from mtconvert.render import vs_float_line

    rows = [f"- **{_esc(t.name)} {t.precision}**: {_esc(vs_float_line(t.compressed['vs_float']))}"
            for t in targets if (t.compressed or {}).get("vs_float")]
    return ["", "**Against the float model**", "", *rows] if rows else []


def _sparsity(targets: list[TargetReport]) -> list[str]:
    """A pruned source: whether each target kept its zeros."""
    from mtconvert.render import target_sparsity_line

    rows = [f"- **{_esc(t.name)} {t.precision}**: {_esc(target_sparsity_line(t.sparsity))}"
            for t in targets if t.sparsity]
    return ["", "**Sparsity**", "", *rows] if rows else []


def _float_fallbacks(targets: list[TargetReport]) -> list[str]:
    """int8 targets converted again with layers kept in float (or why not)."""
    from mtconvert.render import float_fallback_line

    rows = [f"- **{_esc(t.name)} {t.precision}**: {_esc(float_fallback_line(t.float_fallback))}"
            for t in targets if t.float_fallback]
    return ["", "**int8 float fallback**", "", *rows] if rows else []


def _why(t: TargetReport) -> list[str]:
    reason = (t.reason or t.status).strip()
    if len(reason) > _REASON_CHARS:
        reason = reason[:_REASON_CHARS] + "…"
    items = [f"- **{_esc(t.name)} {t.precision}** ({t.status}): {_esc(_one_line(reason))}"]
    first = (t.diagnostics or {}).get("first_divergence")
    if first:
        items.append(f"  - first divergence: {_esc(first.get('op_type', ''))} "
                     f"`{first.get('node')}` (max abs {_num(first.get('max_abs'))})")
    if (t.diagnostics or {}).get("quantization_error"):
        from mtconvert.render import quant_error_lines

        lines = quant_error_lines(t.diagnostics["quantization_error"])
        items += [f"  - {_esc(lines[0])}", *(f"    - {_esc(x)}" for x in lines[1:])]
    gen = t.generation or {}
    if gen.get("first_mismatch_step") is not None:
        k = gen["first_mismatch_step"]
        items.append(f"  - generation: step {k}: reference token {gen['reference_tokens'][k]}, "
                     f"target {gen['target_tokens'][k]} ({gen['tokens_agree']:.0%} of "
                     f"{gen['steps']} agree)")
    if t.log and t.status == "error":
        items.append(f"  - log: `{t.log}`")
    return items


def _snippets(t: TargetReport) -> list[str]:
    if not t.snippets:
        return []
    order = [k for k in _LANGUAGES if k in t.snippets] + [
        k for k in t.snippets if k not in _LANGUAGES]
    names = ", ".join(_LANGUAGES.get(k, k) for k in order)
    lines = ["", "<details>",
             f"<summary>{_html(t.name)} {t.precision}: deployment snippets ({names})</summary>",
             ""]
    for lang in order:
        code = t.snippets[lang].rstrip("\n")
        fence = "`" * max(3, _longest_backticks(code) + 1)
        lines += [f"**{_LANGUAGES.get(lang, lang)}**", "", f"{fence}{lang}", code, fence, ""]
    lines.append("</details>")
    return lines


def _accuracy(t: TargetReport) -> Any:
    """The accuracy column (--eval-data): the target's metric and its drop against the
    reference's; None leaves the column out when no target has one."""
    a = t.accuracy
    if not a:
        return None
    if "error" in a:
        return "not measured"
    return f"{a['target']:.4g} ({-a['drop_points']:+.2f} pt)"


def _longest_backticks(code: str) -> int:
    return max((len(m) for m in re.findall(r"`+", code)), default=0)


def _num(x: Any) -> str:
    return "–" if x is None else f"{x:.3g}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _esc(text: str) -> str:
    """Text in a table cell or list item: no HTML, no column breaks, no stray emphasis."""
    return re.sub(r"([|*_`\[\]])", r"\\\1", _html(str(text)))
