"""How a check is shown: a console table, ``check.json`` (plain numbers) and ``check.png`` (the "V" and the cost)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["format_report", "write_json", "plot_report"]

MARK = {"ok": "ok", "info": "..", "warn": "!!"}


def _g(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _rate(x: float) -> str:
    for unit, f in (("M", 1e6), ("k", 1e3)):
        if x >= f:
            return f"{x / f:.3g}{unit}"
    return f"{x:.3g}"


def _noise_line(n: dict[str, Any], dtype: str) -> str:
    parts = [f"loss {n['loss']:.6g} ({n.get('loss_dtype', dtype)})"]
    if n["sampling_sd"] > 0:
        parts.append(f"sampling sd {_g(n['sampling_sd'])}")
    parts.append(f"ECnoise {_g(n['roundoff'])}" if n["roundoff"] > 0 else "ECnoise: none found")
    if n.get("resolution"):
        parts.append(f"1 ulp {_g(n['resolution'])}")
    parts.append(f"-> noise {_g(n['noise'])} (relative {_g(n['relative'])})")
    return ", ".join(parts)


def _sweep_line(s: dict[str, Any]) -> str:
    if s.get("recommended_mu") is None:
        return "every step failed"
    lo, hi = s["good_range"]
    text = f"best mu {_g(s['recommended_mu'])} (error {_g(s['min_error'])}), good {_g(lo)}..{_g(hi)}"
    c = s.get("configured")
    if c:
        text = f"mu {_g(c['mu'])}: error {_g(c['error'])} [{c['side']}]; " + text
    return text


def format_report(report: dict[str, Any], width: int = 118) -> str:
    """The readable table: one row per measurement, then the findings (``!!`` warn, ``..`` info, ``ok``)."""
    rows: list[tuple[str, str]] = []
    det = report.get("determinism")
    if det:
        rows.append(("determinism", f"same rows twice: max |diff| {_g(det['repeat_max_diff'])}; other batch "
                     f"composition: {_g(det['composition_max_diff'])} ({det['answer_dtype']} answers, scale "
                     f"{_g(det['answer_scale'], 3)})"))
        if det.get("seeded"):
            sd = det["seeded"]
            rows.append(("seed", f"accepted; under one seed: {_g(sd['repeat_max_diff'])} / {_g(sd['composition_max_diff'])}"
                         f"; two seeds differ by {_g(det['seed_effect_max_diff'])}"))
        else:
            rows.append(("seed", "not accepted (no 'seed' parameter / protocol capability)"))
    for name, noise in report.get("noise", {}).items():
        dtype = det["answer_dtype"] if det else ""
        rows.append((f"noise ({name})", _noise_line(noise["plain"], dtype)))
        if "crn" in noise:
            rows.append(("  with one seed", _noise_line(noise["crn"], dtype)))
    for name, res in report.get("step", {}).items():
        rows.append((f"step ({name})", _sweep_line(res["plain"])))
        if "crn" in res:
            rows.append(("  with one seed", _sweep_line(res["crn"])))
    cost = report.get("cost")
    if cost:
        if cost.get("latency_s") is not None:
            rows.append(("latency", f"{cost['latency_s'] * 1e3:.3g} ms per call of 1 row"))
        curve = ", ".join(f"{c['rows']}: {_rate(c['rows_per_s'])}" for c in cost["curve"])
        rows.append(("rows/s by call size", f"{curve}; pays up to ~{cost['saturates_at']} rows"))
        cp = cost.get("copies")
        if cp:
            rows.append((f"{cp['copies']} copies", f"{_rate(cp['rows_per_s_n'])} rows/s vs {_rate(cp['rows_per_s_1'])} "
                         f"with 1 ({cp['speedup']:.2f}x, {cp['rows']} rows per call)"))
    est = report.get("estimators")
    if est:
        rows.append(("queries per step", " | ".join(
            f"{e['estimator']} {e['queries']}" + (f" (~{_g(e['oracle_s'])} s)" if e.get("oracle_s") is not None else "")
            for e in est)))
    rng = report.get("input_range")
    if rng:
        groups = ", ".join(f"{g['rows']}: {g['failed']}/{g['n']}" for g in rng["groups"])
        rows.append(("input range", f"failed {rng['failed']} of {rng['rows']} rows ({groups})"))
        for ex in rng["examples"]:
            vals = ", ".join(f"{v:.4g}" for v in ex["input"]) + (", ..." if ex["width"] > len(ex["input"]) else "")
            rows.append(("  e.g.", f"[{vals}] ({ex['rows']}): {ex['reason'][:80]}"))
        for rule in rng["rules"]:
            rows.append(("  rule", f"fails where {rule}"))
    left = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"bbzo check: {report['subject']['label']}", ""]
    lines += [f"  {a:<{left}}  {b}" if len(b) <= width - left - 4 else _wrap(a, b, left, width) for a, b in rows]
    if report.get("findings"):
        lines += ["", "findings:"]
        for f in report["findings"]:
            lines.append(_wrap(f"{MARK[f['level']]} {f['topic']}:", f["text"], 0, width, sep=" ", indent=5))
    secs = report.get("seconds", {})
    if secs:
        lines += ["", "seconds: " + ", ".join(f"{k} {v:.2g}" for k, v in secs.items())]
    return "\n".join(lines)


def _wrap(head: str, text: str, left: int, width: int, sep: str = "  ", indent: Optional[int] = None) -> str:
    import textwrap

    first = f"  {head:<{left}}{sep}" if left else f"{head}{sep}"
    pad = " " * (indent if indent is not None else len(first))
    return textwrap.fill(text, width=width, initial_indent=first, subsequent_indent=pad)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            return _plain(x.item())
        except (ValueError, RuntimeError):
            return str(x)
    return x


def write_json(report: dict[str, Any], path: Union[str, Path]) -> Path:
    """``check.json``: the report with NaN as null and inf as the string "inf" (strict JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_plain(report), indent=1) + "\n")
    tmp.replace(path)
    return path


def plot_report(report: dict[str, Any], path: Union[str, Path]) -> Optional[Path]:
    """``check.png``: the forward difference's error against mu per space (the "V"; the configured and the
    recommended step marked), and rows/s against the rows per call (with ``copies`` copies, where measured)."""
    steps, cost = report.get("step", {}), report.get("cost")
    if not steps and not cost:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..listeners import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    i = 0
    for name, res in steps.items():
        for kind, s in res.items():
            err = [e if e is not None and math.isfinite(e) and e > 0 else float("nan") for e in s["forward_error"]]
            if all(math.isnan(e) for e in err):
                continue
            c = colors[i % len(colors)]
            i += 1
            tag = f"{name}" + (" (one seed)" if kind == "crn" else "")
            a.plot(s["mus"], err, "o-", ms=3, color=c, label=f"{tag}: forward")
            if s.get("recommended_mu"):
                a.plot([s["recommended_mu"]], [s["min_error"]], "*", ms=12, color=c)
            conf = s.get("configured")
            if conf and conf["error"] is not None and math.isfinite(conf["error"]):
                a.axvline(conf["mu"], color=c, ls=":", lw=1)
                a.plot([conf["mu"]], [conf["error"]], "s", ms=7, mfc="none", color=c)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("finite-difference step mu")
    a.set_ylabel("relative error of the difference quotient")
    a.set_title("step: error vs mu (* best, square: configured)", fontsize=9)
    if a.lines:
        a.legend(fontsize=7)
    if cost:
        xs = [c["rows"] for c in cost["curve"]]
        b.plot(xs, [c["rows_per_s"] for c in cost["curve"]], "o-", label="1 copy")
        cp = cost.get("copies")
        if cp:
            b.plot([cp["rows"]], [cp["rows_per_s_n"]], "^", ms=9, label=f"{cp['copies']} copies")
        b.axvline(cost["saturates_at"], color="gray", ls=":", lw=1)
        b.set_xscale("log")
        b.set_yscale("log")
        b.set_xlabel("rows per call")
        b.set_ylabel("rows / s")
        b.set_title("cost: throughput vs call size (dotted: 80% of the best)", fontsize=9)
        b.legend(fontsize=7)
    else:
        b.axis("off")
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(f"bbzo check: {report['subject']['label']}", 150)[:2]), fontsize=8)
    return save_figure(fig, path)
