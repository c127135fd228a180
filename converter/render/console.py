"""Rich terminal rendering of a Report. rich is imported here only, never at CLI start-up."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from mtconvert.report import Report, TargetReport

_STATUS_STYLE = {"passed": "bold green", "failed": "bold red", "error": "bold magenta",
                 "skipped": "yellow"}


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(report: Report, destination: Any) -> None:
    """To a rich Console, or a text stream (a Console is made for it: 120 columns when the
    stream is no terminal, so logs and pipes get the whole table)."""
    from rich.console import Console

    console = destination if isinstance(destination, Console) else Console(
        file=destination, highlight=False,
        width=None if destination.isatty() else 120)
    _render(report, console)


def _render(report: Report, console: Console) -> None:
    from rich.table import Table

    src = report.source
    console.print(f"[bold]Source[/] {src.path or '(in-memory module)'} [dim]({src.format}"
                  f"{', sha256 ' + src.sha256[:12] if src.sha256 else ''})[/]")
    for name, shape in src.input_shapes.items():
        how = src.input_values.get(name, "")
        console.print(f"  input [cyan]{name}[/] {'x'.join(map(str, shape))}  [dim]{how}[/]")
    if src.sparsity:
        from mtconvert.render import sparsity_line

        console.print(f"  {sparsity_line(src.sparsity)}")
    ref = report.reference
    ref_p50 = ref.latency.p50_ms if ref and ref.latency else None
    if ref:
        console.print(f"[bold]Reference[/] {ref.runtime} {ref.version or ''}  p50 "
                      f"{_num(ref_p50, '.2f')} ms  [dim]({report.settings.get('threads')} threads)[/]")
    table = Table(show_lines=False, header_style="bold")
    for col, just in [("target", "left"), ("status", "left"), ("worst output", "left"),
                      ("max abs", "right"), ("cosine", "right"), ("p50 ms", "right"),
                      ("vs ref", "right"), ("size", "right"), ("peak RSS", "right"),
                      ("convert", "right")]:
        table.add_column(col, justify=just, no_wrap=col in ("target", "status"))
    for t in report.targets.values():
        table.add_row(*_row(t, ref_p50))
    console.print(table)
    if ref and ref.profile:
        console.print("[bold]Reference[/]")
        _profile(ref.profile, console)
    for t in report.targets.values():
        _details(t, console)
    verdict = "[bold green]PASSED[/]" if report.ok else "[bold red]FAILED[/]"
    passed = sum(t.status == "passed" for t in report.targets.values())
    console.print(f"{verdict}  {passed}/{len(report.targets)} targets passed "
                  f"[dim](exit code {report.exit_code})[/]")


def _row(t: TargetReport, ref_p50: float | None) -> list[str]:
    worst = (t.numerics.worst or {}) if t.numerics else {}
    p50 = t.latency.p50_ms if t.latency else None
    from mtconvert.render import ratio_text

    ratio = ratio_text(t.ratio_to_reference(ref_p50))
    size = sum(a.bytes for a in t.artifacts)
    return [f"{t.name} {t.precision}", f"[{_STATUS_STYLE[t.status]}]{t.status}[/]",
            str(worst.get("output", "-")), _num(worst.get("max_abs"), ".2e"),
            _num(worst.get("cosine"), ".6f"), _num(p50, ".2f"), ratio,
            _fmt_bytes(size) if t.artifacts else "-",
            f"{t.memory.peak_rss_mb:.0f} MB" if t.memory else "-",
            f"{t.conversion.seconds:.1f} s" if t.conversion else "-"]


def _generation(t: TargetReport, console: Console) -> None:
    """Generative models: tokens agreed, latency per token, the KV cache; the reference's and
    the target's token ids side by side where they differ."""
    from rich.markup import escape

    from mtconvert.render import kv_cache_place

    g = t.generation
    if not g:
        return
    if "steps" not in g:
        console.print(f"  [yellow]generation not judged[/]: "
                      f"{escape(str(g.get('skipped') or g.get('error')))}")
        return
    tf = g["teacher_forced"]
    console.print(f"  generation: {g['tokens_agree']:.0%} of {g['steps']} greedy tokens agree"
                  + (f", first mismatch at step {g['first_mismatch_step']}"
                     + (" (a near-tie in the reference)" if g["first_mismatch_is_tie"] else "")
                     if g["first_mismatch_step"] is not None else "")
                  + f"; teacher-forced logits max abs {_num(tf['max_abs'], '.2e')} "
                  f"({'within' if tf['passed'] else 'outside'} tolerance)")
    steps = (f"encoder {g['encoder_ms']:.2f} ms + first decoder step" if "encoder_ms" in g
             else f"{len(g['prompt_tokens'] or ())} prompt steps")
    timing = (f"time to first token {g['time_to_first_token_ms']:.2f} ms "
              f"({steps})" if "time_to_first_token_ms" in g
              else "" if g.get("latency_unavailable") == t.latency_unavailable
              else f"latency not measured: {escape(str(g.get('latency_unavailable')))}")
    if "decode_ms_p50" in g:
        timing += f", decode p50 {g['decode_ms_p50']:.2f} / p90 {g['decode_ms_p90']:.2f} ms/token"
    console.print(f"  {timing + '; ' if timing else ''}KV cache {_fmt_bytes(g['kv_cache_bytes'])}"
                  f" at {g['max_cache']} slots{kv_cache_place(g)}")
    for graph, c in (g.get("graphs") or {}).items():  # an encoder-decoder's graphs
        if c:
            console.print(f"  graph {graph}: {c['status']}, max abs "
                          f"{_num((c.get('worst') or {}).get('max_abs'), '.2e')}"
                          + (f": {escape(str(c['reason']))}" if c.get("reason") else ""))
    differ = [(i, r, o) for i, (r, o) in enumerate(zip(g["reference_tokens"],
                                                        g["target_tokens"])) if r != o]
    if differ:
        console.print("  [dim]step  reference  target[/]")
        for i, r, o in differ[:12]:
            console.print(f"  {i:>4}  {r:>9}  {o:>6}")
        if len(differ) > 12:
            console.print(f"  [dim]... {len(differ) - 12} more steps differ[/]")


def _profile(profile: dict[str, Any], console: Console) -> None:
    """--profile: the headline, then the slowest operators, one a line."""
    from rich.markup import escape

    from mtconvert.render import PROFILE_ROWS, profile_headline

    console.print(f"  {escape(profile_headline(profile))}")
    for op in profile.get("ops", [])[:PROFILE_ROWS]:
        console.print(f"    {op['ms']:8.3f} ms {op['share']:6.1%}  {escape(_op_label(op))}"
                      f"[dim]{escape(op['name'])}[/]")


def _op_label(op: dict) -> str:
    """The op type before the name, unless the name already says it (ExecuTorch's entries:
    ``native_layer_norm.out #1``, ``XNNPACK delegate call #3: outside its operators``)."""
    kind, name = op["op_type"], op["name"]
    if kind in name or name.split(" ")[0] == kind.split(" ")[0]:
        return ""
    return f"{kind} "


def _compressed(c: dict[str, Any], console: Console) -> None:
    """A quantized source: its scheme, the route, the size against it, what stayed int8."""
    from rich.markup import escape

    if c.get("vs_float"):
        from mtconvert.render import vs_float_line

        console.print(f"  {escape(vs_float_line(c['vs_float']))}")
    if "source" not in c:
        return
    src = c.get("source") or {}
    size = (f"{_fmt_bytes(c['bytes'])}, {c['size_ratio']:.2f}x the source's "
            f"{_fmt_bytes(c['source_bytes'])}" if c.get("size_ratio") is not None else "size -")
    limit = f" (limit {c['size_limit']:g}x)" if c.get("size_limit") else ""
    console.print(f"  quantized source ({escape(str(src.get('scheme')))}, "
                  f"{src.get('int8_weights')} int8 weights): {escape(c.get('route') or '')}; "
                  f"{size}{limit}")
    if c.get("fallback"):
        console.print(f"  [yellow]fallback:[/] {escape(c['fallback'])}")
    kept = c.get("kept") or {}
    if "int8_tensors" in kept:
        console.print(f"  {kept['int8_tensors']} int8 weight tensors, "
                      f"{kept['same_ints_and_scales']} with the source's ints and scales"
                      + (f", {kept['same_ints_other_scale']} with its ints under another scale"
                         if kept.get("same_ints_other_scale") else "")
                      + (f", {kept['not_from_source']} with ints of its own (re-rounded, or "
                         "float in the source)"
                         if kept.get("not_from_source") else ""))
    elif "error" in kept:
        console.print(f"  int8 tensors not read: {escape(kept['error'])}")


def _details(t: TargetReport, console: Console) -> None:
    from rich.markup import escape

    style = _STATUS_STYLE[t.status]
    console.print(f"[{style}]{escape(t.name)}[/] [dim]{t.precision}[/] [{style}]{t.status}[/]"
                  + (f": {escape(t.reason)}" if t.reason else ""))
    if t.numerics and t.numerics.vs_fp32:
        for out, m in t.numerics.vs_fp32.items():
            fp32 = t.numerics.fp32_worst or {}
            console.print(f"  {t.precision} vs the fp32 artifact, {out}: max abs "
                          f"{_num(m.get('max_abs'), '.2e')}, cosine {_num(m.get('cosine'), '.6f')}"
                          f" [dim](fp32 artifact vs reference: max abs "
                          f"{_num(fp32.get('max_abs'), '.2e')})[/]")
    if t.compressed:
        _compressed(t.compressed, console)
    if t.sparsity:
        from mtconvert.render import target_sparsity_line

        console.print(f"  {escape(target_sparsity_line(t.sparsity))}")
    for out, m in ((t.numerics.outputs if t.numerics else {}) or {}).items():
        if m.get("top1_agreement") is not None:
            console.print(f"  {out}: top-1 agreement {m['top1_agreement']:.1%}, top-5 "
                          f"{m['top5_agreement']:.1%}")
    acc = t.accuracy or {}
    if "metric" in acc:
        console.print(f"  {acc['metric']} on {acc['items']} items: {acc['target']:.4g} "
                      f"(reference {acc['reference']:.4g}, {-acc['drop_points']:+.2f} points; "
                      f"limit -{acc['max_drop_points']:g})")
    vs = t.latency_vs_reference or {}
    if "ratio_p50" in vs:
        lo, hi = vs["ci95"]
        console.print(f"  latency vs reference, timed interleaved ({vs['rounds']} rounds): "
                      f"{vs['ratio_p50']:.2f}x [dim](95% interval {lo:.2f}-{hi:.2f}; round-to-round "
                      f"spread: reference {vs['reference_spread']:.0%}, target "
                      f"{vs['target_spread']:.0%})[/]"
                      + ("  [yellow]too noisy to tell a 10% change[/]" if vs["noisy"] else ""))
    elif vs.get("error"):
        console.print(f"  latency: timed alone ({escape(vs['error'])})")
    if t.profile:
        _profile(t.profile, console)
    if t.sweep:
        ok = sum(e["status"] == "passed" for e in t.sweep)
        console.print(f"  shape sweep: {ok}/{len(t.sweep)} extra shapes passed")
        for e in t.sweep:
            if e["status"] != "passed":
                shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in e["input_shapes"].items())
                console.print(f"    [{_STATUS_STYLE[e['status']]}]{e['status']}[/] {shapes}: "
                              f"{escape(e['reason'] or '')}")
    first = (t.diagnostics or {}).get("first_divergence")
    if first:
        d = t.diagnostics
        where = "" if d.get("exact") or not d.get("unresolved_between") else (
            f" [dim](after {escape(str(d.get('last_match')))}; {d['unresolved_between']} "
            "operator(s) between could not be isolated)[/]")
        if d.get("fused_with"):
            where += (f" [dim](computed in one op with "
                      f"{escape(', '.join(d['fused_with']))})[/]")
        how = (f"{d['probes']} probes" if "probes" in d else
               f"{d.get('matched')}/{d.get('observable')} source tensors matched")
        target = (f" [dim](target {first['target_op_type']} {escape(str(first['target']))})[/]"
                  if first.get("target") else "")
        console.print(f"  first divergence: {first['op_type']} [cyan]{escape(first['node'])}[/]: "
                      f"max abs {_num(first.get('max_abs'), '.3g')}{target}{where} "
                      f"[dim]({d.get('method')}: {how}, {d['seconds']} s)[/]")
    elif t.diagnostics and "result" in t.diagnostics:
        console.print(f"  localization: {t.diagnostics.get('result')}")
    if (t.diagnostics or {}).get("quantization_error"):
        from mtconvert.render import quant_error_lines

        for i, line in enumerate(quant_error_lines(t.diagnostics["quantization_error"])):
            console.print(("  " if i == 0 else "    ") + escape(line))
    if t.float_fallback:
        from mtconvert.render import float_fallback_line

        console.print(f"  {escape(float_fallback_line(t.float_fallback))}")
    nonfinite = (t.diagnostics or {}).get("first_nonfinite_op")
    if nonfinite:
        console.print(f"  first op producing {'inf' if nonfinite['inf'] else 'NaN'}: "
                      f"{nonfinite['op_type']} [cyan]{escape(nonfinite['op'])}[/] "
                      f"({nonfinite['dtype']})")
    _generation(t, console)
    if t.latency_unavailable:
        console.print(f"  [dim]latency not measured: {escape(t.latency_unavailable)}[/]")
    for f in t.findings:
        style = {"error": "red", "warning": "yellow"}.get(f["severity"], "dim")
        console.print(f"  [{style}]{f['severity']}[/] {escape(f['message'])}")
    if t.artifacts:
        console.print("  [dim]" + ", ".join(
            f"{escape(a.path)}" + ("" if a.role == "artifact" else f" ({a.role})")
            for a in t.artifacts) + "[/]")
    if t.log and t.status == "error":
        console.print(f"  [dim]log: {t.log}[/]")
