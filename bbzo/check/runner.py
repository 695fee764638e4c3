"""``check(subject)``: every measurement of ``bbzo check`` on one subject, and what they mean for training.

The result is one plain dict (``check.json``): the measurements of :mod:`bbzo.check.measure`, the queries per
step of the applicable estimators with their estimated oracle time, and ``findings`` -- one line each, ``ok``,
``info`` or ``warn``, saying what a number means and what to change.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import BbzoError
from .fd import mu_grid
from .measure import CHECK_SEED, allow_failures, cost, determinism, input_range, noise_floor, step_sweep
from .spaces import Subject

__all__ = ["check", "FORMAT", "ROUNDOFF_ULPS"]

FORMAT = "bbzo-check/1"
#: Answers that move by at most this many ulps between calls count as round-off, not as noise.
ROUNDOFF_ULPS = 64.0
#: A relative gradient error above this (or a reference that uncertain) is no gradient at all.
UNUSABLE = 0.5


def _g(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2g}"


def _rate_at(curve: list[dict[str, Any]], n: int) -> float:
    """Rows/s of a call of ``n`` rows, interpolated in log-log from the measured curve (flat beyond its ends)."""
    xs = np.log([c["rows"] for c in curve])
    ys = np.log([c["rows_per_s"] for c in curve])
    return float(np.exp(np.interp(math.log(max(1, n)), xs, ys)))


def _estimator_table(subject: Subject, cost_res: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """Queries, oracle rows and the estimated oracle seconds per step: the base evaluation, then the probes in calls
    of ``sets_per_call`` parameter sets (all in one by default), each evaluation ``calls_per_query`` calls long."""
    b, k = subject.batch, subject.calls_per_query
    out = []
    for name, queries, note in subject.estimators:
        q = int(queries)
        row: dict[str, Any] = {"estimator": name, "queries": q, "rows": q * b * k, "note": note}
        if cost_res:
            probes = max(0, q - 1)
            per_call = min(probes, subject.sets_per_call or probes) or 1
            calls = [(b, 1)]
            if probes:
                full, rest = divmod(probes, per_call)
                calls += [(per_call * b, full)] + ([(rest * b, 1)] if rest else [])
            row["oracle_s"] = k * sum(m * n / _rate_at(cost_res["curve"], n) for n, m in calls if m)
        out.append(row)
    return out


def _determinism_findings(det: dict[str, Any]) -> list[dict[str, str]]:
    f = []
    worst = max(det["repeat_ulps"], det["composition_ulps"])
    seeded = det.get("seeded")
    if det["deterministic"]:
        f.append({"level": "ok", "topic": "determinism", "text": "deterministic: the same rows give bitwise the same "
                  "answers, alone, twice, or shuffled among other rows."})
    elif worst <= ROUNDOFF_ULPS:
        f.append({"level": "info", "topic": "determinism", "text": f"deterministic up to round-off: answers move by "
                  f"{worst:.0f} ulps of {det['answer_dtype']} between calls (arithmetic that depends on the call's "
                  "size); a step's base and probe calls differ by that much, which the noise floor includes."})
    elif seeded is not None and seeded["deterministic"]:
        f.append({"level": "warn", "topic": "determinism", "text": f"nondeterministic (answers move by "
                  f"{_g(max(det['repeat_max_diff'], det['composition_max_diff']))}), but a function of the rows under "
                  "a fixed seed: train with common random numbers (Trainer(crn_seed=...), --crn), so the base and every "
                  "probe of a step share one random stream."})
    elif seeded is not None:
        f.append({"level": "warn", "topic": "determinism", "text": f"nondeterministic even under one fixed seed (answers "
                  f"move by {_g(max(seeded['repeat_max_diff'], seeded['composition_max_diff']))}): for common random "
                  "numbers every row must be answered from the seed alone, whatever else is in the call (draw the "
                  "noise from the seed once and use it for every row)."})
    else:
        f.append({"level": "warn", "topic": "determinism", "text": f"nondeterministic (answers move by "
                  f"{_g(max(det['repeat_max_diff'], det['composition_max_diff']))}, {worst:.3g} ulps) and it takes no "
                  "seed: every finite difference carries this noise divided by mu. Give the simulator a seed (a 'seed' "
                  "keyword, or the protocol's 'seed' capability: docs/check.md) and train with common random numbers, "
                  "or average more samples inside it."})
    if seeded is not None and det.get("seed_effect_max_diff", 0) == 0 and not det["deterministic"]:
        f.append({"level": "warn", "topic": "seed", "text": "it takes a seed but two seeds give the same answers: is "
                  "the seed used?"})
    return f


def _step_findings(sweep: dict[str, Any], label: str) -> list[dict[str, str]]:
    rec, conf = sweep.get("recommended_mu"), sweep.get("configured")
    names = "/".join(sweep["estimators"])
    if rec is None:
        return [{"level": "warn", "topic": f"step ({label})", "text": "every step of the sweep failed: the oracle "
                 "cannot answer the moved points (see input range)."}]
    lo, hi = sweep["good_range"]
    if sweep["min_error"] > UNUSABLE or (sweep.get("reference_error") or 0) > UNUSABLE:
        return [{"level": "warn", "topic": f"step ({label})", "text": f"no step of the sweep gives a usable difference "
                 f"quotient: the best error is {_g(sweep['min_error'])} (at mu {_g(rec)}), the reference itself is "
                 f"uncertain by {_g(sweep.get('reference_error'))}. The loss's noise is too large for finite "
                 "differences at these steps: remove it (a seed and common random numbers, more samples inside the "
                 "simulator) before training."}]
    if conf is None:
        who = f"for {names}: " if names else ""
        return [{"level": "info", "topic": f"step ({label})", "text": f"{who}mu {_g(rec)} (error "
                 f"{_g(sweep['min_error'])}; good from {_g(lo)} to {_g(hi)})."}]
    mu, err = conf["mu"], conf["error"]
    if conf["side"] == "good":
        return [{"level": "ok", "topic": f"step ({label})", "text": f"mu {_g(mu)} is in the good range {_g(lo)}..{_g(hi)} "
                 f"(error {_g(err)}; best {_g(sweep['min_error'])} at {_g(rec)})."}]
    if conf["side"] == "failed":
        return [{"level": "warn", "topic": f"step ({label})", "text": f"mu {_g(mu)} moves the points out of the "
                 f"oracle's range (failed evaluations); use {_g(rec)}."}]
    if conf["side"] == "round-off":  # the warning the issue asks for: the configured step drowns in round-off / noise
        return [{"level": "warn", "topic": f"step ({label})", "text": f"mu {_g(mu)} is on the round-off side: error "
                 f"{_g(err)} (round-off alone {_g(conf['roundoff_error'])}), {conf['vs_best']:.3g}x the best; raise mu "
                 f"to {_g(rec)} (good from {_g(lo)} to {_g(hi)})."}]
    return [{"level": "warn" if err > 0.1 else "info", "topic": f"step ({label})", "text": f"mu {_g(mu)} is on the "
             f"truncation side (curvature or kinks): error {_g(err)}, {conf['vs_best']:.3g}x the best; {_g(rec)} gives "
             f"{_g(sweep['min_error'])} (good from {_g(lo)} to {_g(hi)})."}]


def check(subject: Subject, *, coords: int = 8, mus: Optional[Sequence[float]] = None, repeats: int = 5,
          seed: int = 0, sizes: Optional[Sequence[int]] = None, explore: int = 64,
          box: Optional[tuple[float, float]] = None, copies: int = 2, progress: bool = True,
          sections: Sequence[str] = ("determinism", "noise", "step", "cost", "range")) -> dict[str, Any]:
    """Look at ``subject``'s black box before training through it; returns the ``check.json`` dict.

    Args:
        coords: Coordinates per space in the step sweep (spread over the parameter tensors).
        mus: The steps of the sweep (default 1e-9 .. 1e-1, two per decade, plus each space's configured mu).
        repeats: Evaluations of the current point for the sampling noise.
        seed: Seed of the coordinate samples and the explored rows.
        sizes: Rows per call for the cost curve (default 1, 4, 16, ... up to the largest step's rows, <= 16384).
        explore: Rows per noise scale in the input-range search (0: only the current rows).
        box: Also explore uniform rows in ``[lo, hi]`` (every input value).
        copies: Copies of an external program for the ``--oracle-workers`` measurement (1: skip).
        sections: Which measurements to run.
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    report: dict[str, Any] = {"format": FORMAT, "subject": {"label": subject.label, "oracle": subject.oracle.name,
                                                              "batch": subject.batch, **subject.info},
                              "settings": {"coords": coords, "repeats": repeats, "seed": seed, "explore": explore,
                                           "box": list(box) if box else None, "copies": copies},
                              "seconds": {}, "findings": []}
    steps_total = len(sections) + (len(subject.spaces) - 1) * (("noise" in sections) + ("step" in sections))
    bar = tqdm(total=steps_total, desc="bbzo check", disable=not progress, leave=False)

    def section(name: str) -> float:
        bar.set_postfix_str(name)
        return time.perf_counter()

    def done(name: str, t0: float) -> None:
        report["seconds"][name] = round(report["seconds"].get(name, 0.0) + time.perf_counter() - t0, 3)
        bar.update(1)

    def guarded(name: str, fn: Any) -> Any:
        """Run one measurement; a black box that raises (or a failed section) is recorded, the others go on."""
        try:
            return fn()
        except BbzoError as e:
            report.setdefault("errors", {})[name] = str(e).split(" | ")[0][:400]
            return None

    try:
        # rows the oracle cannot answer come back as NaN (and show in the input range) instead of ending the check
        with allow_failures(subject.oracle):
            _measure(subject, report, sections, guarded, section, done, bar, g, coords=coords, mus=mus,
                     repeats=repeats, seed=seed, sizes=sizes, explore=explore, box=box, copies=copies)
    finally:
        bar.close()
    report["findings"] = findings(report)
    return report


def _measure(subject: Subject, report: dict[str, Any], sections: Sequence[str], guarded: Any, section: Any,
             done: Any, bar: Any, g: torch.Generator, *, coords: int, mus: Optional[Sequence[float]], repeats: int,
             seed: int, sizes: Optional[Sequence[int]], explore: int, box: Optional[tuple[float, float]],
             copies: int) -> None:
    det = None
    if "determinism" in sections:
        t0 = section("determinism")
        det = guarded("determinism", lambda: determinism(subject, seed))
        if det is not None:
            report["determinism"] = det
        done("determinism", t0)
    noisy = det is not None and not det["deterministic"] and \
        max(det["repeat_ulps"], det["composition_ulps"]) > ROUNDOFF_ULPS
    crn = subject.oracle.accepts_seed and noisy  # look at the oracle both as it is and with common random numbers
    coords_of = {sp.name: sp.sample(coords, g) for sp in subject.spaces}
    report["noise"], report["step"] = {}, {}
    for sp in subject.spaces:
        noise = None
        if "noise" in sections:
            t0 = section(f"noise ({sp.name})")
            plain = guarded(f"noise ({sp.name})", lambda: noise_floor(sp, coords_of[sp.name], repeats))
            if plain is not None:
                noise = {"plain": plain}
                if crn:
                    seeded = guarded(f"noise ({sp.name}, one seed)",
                                     lambda: noise_floor(sp, coords_of[sp.name], repeats, seed=CHECK_SEED))
                    if seeded is not None:
                        noise["crn"] = seeded
                report["noise"][sp.name] = noise
            done("noise", t0)
        if "step" in sections:
            t0 = section(f"step ({sp.name})")
            grid = list(mus) if mus else mu_grid(include=[sp.mu] if sp.mu else ())
            if sp.mu and sp.mu not in grid:
                grid = sorted(set(grid) | {sp.mu})
            eps = noise["plain"]["noise_per_output"] if noise else 0.0
            res = guarded(f"step ({sp.name})", lambda: {"plain": step_sweep(sp, coords_of[sp.name], grid, eps)})
            if res is not None:
                if crn:
                    eps_c = noise["crn"]["noise_per_output"] if noise and "crn" in noise else 0.0
                    seeded = guarded(f"step ({sp.name}, one seed)",
                                     lambda: step_sweep(sp, coords_of[sp.name], grid, eps_c, seed=CHECK_SEED))
                    if seeded is not None:
                        res["crn"] = seeded
                report["step"][sp.name] = res
            done("step", t0)
    cost_res = None
    if "cost" in sections:
        t0 = section("cost")
        step_rows = min(max([q for _, q, _ in subject.estimators] or [1]), subject.sets_per_call or 10 ** 9) * subject.batch
        top = 16384  # beyond a step's rows too: where batching stops paying (a slow call ends the curve)
        grid_sizes = sizes or sorted({1, *[4 ** i for i in range(1, 8) if 4 ** i <= top], top})
        cost_res = guarded("cost", lambda: cost(subject, grid_sizes, copies=copies if subject.spawn else 1,
                                                step_rows=step_rows,
                                                progress=lambda s: bar.set_postfix_str(f"cost: {s}")))
        if cost_res is not None:
            report["cost"] = cost_res
        done("cost", t0)
    report["estimators"] = _estimator_table(subject, cost_res)
    if "range" in sections:
        t0 = section("input range")
        label = subject.spaces[-1].label if subject.spaces and subject.spaces[-1].name == "oracle inputs" else None
        rng = guarded("input range", lambda: input_range(subject, per_scale=explore, box=box, seed=seed, label=label,
                                                          scales=(0.01, 0.1, 0.3, 1.0, 3.0) if explore else ()))
        if rng is not None:
            report["input_range"] = rng
        done("input range", t0)


def findings(report: dict[str, Any]) -> list[dict[str, str]]:
    """What the numbers mean: one line per topic, ``ok`` / ``info`` / ``warn``."""
    out: list[dict[str, str]] = []
    for name, err in report.get("errors", {}).items():
        out.append({"level": "warn", "topic": name, "text": f"could not be measured: {err}"})
    det = report.get("determinism")
    if det is not None:
        out += _determinism_findings(det)
    for name, res in report.get("step", {}).items():
        main = res.get("crn", res["plain"])
        label = name + (", with common random numbers" if "crn" in res else "")
        out += _step_findings(main, label)
        if "crn" in res and res["plain"].get("min_error") is not None and res["crn"].get("min_error") is not None:
            conf_p, conf_c = res["plain"].get("configured"), res["crn"].get("configured")
            if conf_p and conf_c:
                out.append({"level": "info", "topic": f"crn ({name})", "text": f"at mu {_g(conf_p['mu'])}: gradient "
                            f"error {_g(conf_p['error'])} without common random numbers, {_g(conf_c['error'])} with them."})
    cost_res = report.get("cost")
    if cost_res:
        sat, best = cost_res["saturates_at"], cost_res["best_rows_per_s"]
        out.append({"level": "info", "topic": "cost", "text": f"{_g(best)} rows/s at best; batching pays up to about "
                    f"{sat} rows per call (80% of the best)."})
        cp = cost_res.get("copies")
        if cp:
            if cp["speedup"] >= 1.2:
                out.append({"level": "info", "topic": "copies", "text": f"{cp['copies']} copies answer "
                            f"{cp['speedup']:.2f}x the rows/s of one: train with --oracle-workers {cp['copies']}."})
            else:
                out.append({"level": "info", "topic": "copies", "text": f"{cp['copies']} copies answer "
                            f"{cp['speedup']:.2f}x the rows/s of one: more copies do not pay here (a fast program, or "
                            "the cores are busy)."})
    est = report.get("estimators") or []
    if est:
        names = {e["estimator"]: e for e in est}
        cheapest = min(est, key=lambda e: e["queries"])
        if "oracle_cge" in names and "cge" in names and names["oracle_cge"]["queries"] < names["cge"]["queries"]:
            out.append({"level": "info", "topic": "estimator", "text": f"oracle_cge needs {names['oracle_cge']['queries']} "
                        f"queries per step, cge {names['cge']['queries']}: the model is white-box, so only the oracle "
                        "needs finite differences (--estimator oracle_cge)."})
        elif cheapest["estimator"] != "cge" and len(est) > 1:
            out.append({"level": "info", "topic": "estimator", "text": f"cheapest per step: {cheapest['estimator']} "
                        f"({cheapest['queries']} queries; {cheapest['note']})."})
    rng = report.get("input_range")
    if rng is not None:
        if rng["failed"] == 0:
            out.append({"level": "ok", "topic": "input range", "text": f"all {rng['rows']} rows answered (the current "
                        "rows and noisy copies up to 3x their RMS)."})
        else:
            cur = rng["groups"][0]["failed"]
            rules = f" Failing rows: {'; '.join(rng['rules'])}." if rng["rules"] else ""
            out.append({"level": "warn", "topic": "input range", "text": f"{rng['failed']} of {rng['rows']} rows failed"
                        f" ({cur} of the current rows).{rules} Keep the model's outputs in the valid range (e.g. a "
                        "sigmoid or clamp at its output), lower mu / the learning rate, or train with "
                        "--on-oracle-error skip|penalize."})
    return out
