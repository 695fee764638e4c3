"""The measurements of ``bbzo check``, one function each, every one a dict of plain numbers (``check.json``).

* :func:`determinism` -- the same rows twice, and inside a call of another composition; with a fixed seed
  and with two seeds where the oracle takes one;
* :func:`noise_floor` -- the loss's noise at the current point: repeated evaluations (sampling noise) and
  :func:`~bbzo.check.fd.ecnoise` along a few coordinates (round-off in the dtype the oracle answers in);
* :func:`step_sweep` -- the finite-difference step: the "V" curve of :func:`~bbzo.check.fd.analyse_sweep`;
* :func:`cost` -- latency, rows/s against the call size, and with 2 copies of a program;
* :func:`input_range` -- which rows fail (NaN/inf, ``failed=``, or an exception), with their inputs.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import BbzoError
from ..oracle import Oracle, answering_failures_with_nan, common_random_numbers
from .fd import ECNOISE_POINTS, analyse_sweep, ecnoise
from .spaces import Space, Subject

__all__ = ["determinism", "noise_floor", "step_sweep", "cost", "input_range", "ulps", "allow_failures",
           "CHECK_SEED", "OTHER_SEED"]

#: The fixed common-random-numbers seeds the check uses (any two distinct values would do).
CHECK_SEED, OTHER_SEED = 1234, 5678


def ulps(diff: float, scale: float, dtype: torch.dtype) -> float:
    """``diff`` in units of the spacing of ``dtype`` at ``scale`` (how many representable steps apart)."""
    if not dtype.is_floating_point:
        return float("nan")
    spacing = torch.finfo(dtype).eps * max(abs(scale), torch.finfo(dtype).tiny)
    return diff / spacing


@contextmanager
def allow_failures(oracle: Oracle) -> Iterator[None]:
    """Let the oracles answer rows they cannot answer with NaN instead of raising (as a tolerant training step does)."""
    with answering_failures_with_nan():
        yield


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs()
    d = d[torch.isfinite(d)]
    return float(d.max()) if d.numel() else 0.0


# ---------------------------------------------------------------------------- determinism
def _compare(subject: Subject, seed: Optional[int], generator: torch.Generator) -> dict[str, Any]:
    """The rows twice in the same call, then inside a shuffled call with other rows, then the first row alone."""
    b = subject.batch
    idx = torch.arange(b)
    ctx = common_random_numbers(seed) if seed is not None else nullcontext()
    with ctx:
        first = subject.query(idx)
        again = subject.query(idx)
        perm = torch.randperm(b, generator=generator)
        extra = torch.randint(0, b, (max(1, b // 2),), generator=generator)
        mixed_idx = torch.cat([perm, extra])  # the same rows, shuffled, with duplicates after them
        mixed = subject.query(mixed_idx)[:b][torch.argsort(perm)]
        alone = subject.query(idx[:1])
    fin = first.double()[torch.isfinite(first.double())]
    scale = float(fin.abs().max()) if fin.numel() else 0.0
    return {"repeat_max_diff": _max_diff(first, again), "composition_max_diff": max(_max_diff(first, mixed),
                                                                                      _max_diff(first[:1], alone)),
            "answer_scale": scale, "answers": first}


def determinism(subject: Subject, seed: int = 0) -> dict[str, Any]:
    """Are the answers a function of the rows alone (and of the seed, for an oracle that takes one)?

    Returns ``repeat_max_diff`` (the rows twice), ``composition_max_diff`` (the rows shuffled inside a larger call,
    and the first row alone), their size in ulps of the answers' dtype, ``deterministic`` (both 0), and for an
    oracle that takes a seed the same under one fixed seed (``seeded``) and the change between two seeds
    (``seed_effect_max_diff``: 0 means the seed is ignored).
    """
    g = torch.Generator().manual_seed(seed)
    plain = _compare(subject, None, g)
    answers = plain.pop("answers")
    dtype = answers.dtype
    out: dict[str, Any] = {**plain, "answer_dtype": str(dtype).replace("torch.", ""),
                           "repeat_ulps": ulps(plain["repeat_max_diff"], plain["answer_scale"], dtype),
                           "composition_ulps": ulps(plain["composition_max_diff"], plain["answer_scale"], dtype),
                           "accepts_seed": bool(subject.oracle.accepts_seed)}
    out["deterministic"] = plain["repeat_max_diff"] == 0 and plain["composition_max_diff"] == 0
    if subject.oracle.accepts_seed:
        seeded = _compare(subject, CHECK_SEED, g)
        a = seeded.pop("answers")
        with common_random_numbers(OTHER_SEED):
            other = subject.query(torch.arange(subject.batch))
        out["seeded"] = {**seeded, "deterministic": seeded["repeat_max_diff"] == 0 and seeded["composition_max_diff"] == 0}
        out["seed_effect_max_diff"] = _max_diff(a, other)
    return out


# ---------------------------------------------------------------------------- the noise floor
def _ecnoise_line(space: Space, coord: int, delta: float) -> tuple[float, int, float]:
    """ECnoise along coordinate ``coord`` with spacing ``delta``, adapting it (x100 / /100, at most 4 tries).

    ``inform`` 5: the loss does not move at all along this coordinate, even at 1e4 times the spacing (a coordinate
    with no effect, e.g. behind a zero layer): it says nothing about the noise.
    """
    half = ECNOISE_POINTS // 2
    level, inform = 0.0, 3
    for attempt in range(4):
        steps = [delta * (i - half) for i in range(ECNOISE_POINTS)]
        vals = space.evaluate([coord] * ECNOISE_POINTS, steps).numpy()  # (nf, S)
        if not np.isfinite(vals).all():
            return float("nan"), 4, delta
        if attempt == 0 and (vals == vals[:1]).all():  # flat here: is it flat far out too?
            far = space.evaluate([coord] * 2, [0.0, delta * 1e4]).numpy()
            if np.isfinite(far).all() and (far == far[:1]).all():
                return 0.0, 5, delta
        level, inform = ecnoise(vals)
        if inform == 1:
            return level, inform, delta
        delta = delta * 100 if inform == 2 else delta / 100
    return level, inform, delta


def noise_floor(space: Space, coords: Sequence[int], repeats: int = 5, seed: Optional[int] = None,
                ecnoise_coords: int = 2, max_tries: int = 6) -> dict[str, Any]:
    """The loss's noise at the current point in ``space``.

    ``repeats`` separate evaluations of the current point give the sampling noise (0 for a deterministic
    oracle; under ``seed``, what is left with common random numbers); :func:`~bbzo.check.fd.ecnoise` along
    ``ecnoise_coords`` of ``coords`` (skipping coordinates the loss does not depend on; at most ``max_tries``)
    gives the noise along a line (tiny steps of about a thousand ulps of the coordinates' dtype): round-off for
    a deterministic oracle. ``noise`` is the largest of the two and one ulp of the loss in the dtype it is
    computed in (``resolution``): the floor of a finite difference's numerator.
    """
    ctx = common_random_numbers(seed) if seed is not None else nullcontext()
    with ctx:
        base = torch.cat([space.evaluate([coords[0]], [0.0]) for _ in range(max(2, repeats))])  # (R, S)
        loss = base.mean(1)  # (R,)
        repeat_sd = base.std(0).numpy() if base.shape[0] > 1 else np.zeros(base.shape[1])
        eps = torch.finfo(space.dtype).eps
        lines: list[dict[str, Any]] = []
        for c in list(coords)[:max_tries]:
            if sum(ln["inform"] == 1 for ln in lines) >= ecnoise_coords:
                break
            delta = 1e3 * eps * max(abs(space.value(c)), 0.1 * space.scale(), 1e-3)
            lvl, inform, used = _ecnoise_line(space, c, delta)
            lines.append({"coord": int(c), "label": space.label(c), "level": lvl, "inform": inform, "spacing": used})
    found = [ln["level"] for ln in lines if ln["inform"] == 1]
    along = float(np.median(found)) if found else 0.0
    sampling = _nanmedian(repeat_sd)  # rows the oracle cannot answer (NaN) are left out, here and below
    level = float(np.nanmean(loss.numpy())) if np.isfinite(loss.numpy()).any() else float("nan")
    loss_dtype = getattr(space, "loss_dtype", torch.float64)
    resolution = torch.finfo(loss_dtype).eps * np.abs(base.mean(0).numpy())  # (S,): one ulp of each output
    noise = max(along, sampling, _nanmedian(resolution))
    return {"loss": level, "loss_repeats": loss.tolist(), "loss_dtype": str(loss_dtype).replace("torch.", ""),
            "sampling_sd": sampling, "sampling_sd_per_sample": repeat_sd.tolist() if space.per_sample else None,
            "roundoff": along, "ecnoise": lines, "resolution": _nanmedian(resolution), "noise": noise,
            "relative": noise / abs(level) if level else float("inf"),
            "noise_per_output": np.nan_to_num(np.maximum(np.maximum(repeat_sd, along), resolution), nan=noise).tolist()}


def _nanmedian(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else 0.0


# ---------------------------------------------------------------------------- the finite-difference step
def step_sweep(space: Space, coords: Sequence[int], mus: Sequence[float], noise: Any,
               seed: Optional[int] = None) -> dict[str, Any]:
    """Forward and central differences of ``coords`` over the steps ``mus`` in one batched evaluation, analysed.

    The current point is evaluated in a call of its own (as a training step's base query: an oracle whose answers
    depend on the call's composition, or that draws fresh noise per call, shows it here), then ``+mu`` and ``-mu``
    for every coordinate and step in one batched evaluation (the central differences pair values of one call).
    Evaluations that fail (NaN/inf, rows reported failed) leave NaN differences; :func:`~bbzo.check.fd.analyse_sweep`
    does the rest.
    """
    c_list, mus = [int(c) for c in coords], [float(m) for m in mus]
    pts_c, pts_s = [c_list[0]], [0.0]
    for c in c_list:
        for m in mus:
            pts_c += [c, c]
            pts_s += [m, -m]
    ctx = common_random_numbers(seed) if seed is not None else nullcontext()
    with ctx:
        base = space.evaluate([c_list[0]], [0.0]).numpy()[0]  # its own call, as a training step's base query
        vals = space.evaluate(pts_c, pts_s).numpy()  # (1 + 2 C H, S): the current point again, then the moves
    body = vals[1:].reshape(len(c_list), len(mus), 2, -1)
    m = np.asarray(mus)[None, :, None]
    fwd = (body[:, :, 0] - base[None, None]) / m
    cen = (body[:, :, 0] - body[:, :, 1]) / (2 * m)
    res = analyse_sweep(mus, fwd, cen, np.asarray(noise), configured=space.mu)
    res.update({"space": space.name, "estimators": list(space.estimators), "coords": c_list,
                "labels": [space.label(c) for c in c_list], "points": len(pts_c), "crn_seed": seed,
                "base_loss": float(base.mean())})
    return res


# ---------------------------------------------------------------------------- cost
def _time_call(fn: Callable[[], Any], min_s: float = 0.2, max_reps: int = 5) -> float:
    """Best wall time of ``fn`` over a few calls (at least 2, until ``min_s`` is spent; at most ``max_reps``)."""
    best, spent, reps = math.inf, 0.0, 0
    while reps < 2 or (spent < min_s and reps < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


def _tiled_query(oracle: Oracle, subject: Subject, n: int) -> Callable[[], Any]:
    idx = torch.arange(n) % subject.batch
    rows = subject.rows[idx]
    conds = tuple(c[idx] for c in subject.conditions)
    return lambda: oracle.query(rows, *conds)


def cost(subject: Subject, sizes: Sequence[int], max_call_s: float = 2.0, copies: int = 2,
         step_rows: Optional[int] = None, progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """What a call costs: latency (one row), rows/s against the call size, and with ``copies`` copies.

    Each size is called once to warm up (a jit traces each new size), then timed (best of 2-5 calls). Sizes
    stop growing after a call that takes more than ``max_call_s``, or once two sizes in a row gained less than
    10% and ``step_rows`` (a training step's rows) are covered. ``saturates_at`` is the smallest size that
    reaches 80% of the best rows/s: beyond it, batching stops paying. With ``subject.spawn``, the same is
    measured at the largest size (or ``step_rows``) with ``copies`` copies of the program (or, when the oracle
    already runs ``subject.copies > 1`` copies, with one copy, to compare).
    """
    oracle = subject.oracle
    curve = []
    for n in sorted(set(int(s) for s in sizes)):
        if progress:
            progress(f"{n} rows per call")
        call = _tiled_query(oracle, subject, n)
        t0 = time.perf_counter()
        call()  # warm-up (a jit traces each new size, caches fill)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        call()
        t = time.perf_counter() - t0
        if t < max_call_s:
            t = min(t, _time_call(call))
        curve.append({"rows": n, "seconds": t, "rows_per_s": n / t, "first_call_s": first})
        if t > max_call_s:
            break
        if len(curve) >= 3 and n >= (step_rows or 0) and all(c["rows_per_s"] < 1.1 * curve[-3]["rows_per_s"]
                                                              for c in curve[-2:]):
            break  # two sizes in a row without a 10% gain, and a training step's rows are covered: saturated
    latency = next((c["seconds"] for c in curve if c["rows"] == 1), None)
    best = max(c["rows_per_s"] for c in curve)
    sat = next(c["rows"] for c in curve if c["rows_per_s"] >= 0.8 * best)
    out: dict[str, Any] = {"latency_s": latency, "curve": curve, "best_rows_per_s": best, "saturates_at": sat}
    if subject.spawn is not None and copies > 1:
        n = min(step_rows or curve[-1]["rows"], curve[-1]["rows"])
        n = max(n, 64)
        if subject.copies > 1:  # the oracle already runs several copies (--oracle-workers): compare with one
            copies = subject.copies
        if progress:
            progress(f"{copies} copies, {n} rows per call")
        own = _time_call(_tiled_query(oracle, subject, n))
        other = subject.spawn(1 if subject.copies > 1 else copies)
        try:
            call = _tiled_query(other, subject, n)
            call()
            t = _time_call(call)
        finally:
            other.close()
        one, many = (t, own) if subject.copies > 1 else (own, t)
        out["copies"] = {"copies": copies, "rows": n, "rows_per_s_1": n / one, "rows_per_s_n": n / many,
                         "speedup": one / many}
    return out


# ---------------------------------------------------------------------------- input range
def _answer(oracle: Oracle, rows: torch.Tensor, conds: tuple, budget: list[int]) -> tuple[torch.Tensor, list[str]]:
    """``(ok (N,) bool, reasons)``: rows answered with finite values; an exception is bisected to its rows."""
    n = rows.shape[0]
    try:
        with allow_failures(oracle):
            ans = oracle.query(rows, *conds)
        ok = torch.isfinite(ans.reshape(n, -1)).all(dim=1)
        return ok, ["" if o else "NaN/inf or reported failed" for o in ok.tolist()]
    except BbzoError as e:
        budget[0] -= 1
        if n == 1 or budget[0] <= 0:
            reason = str(e).split(" | ")[0][:200]
            return torch.zeros(n, dtype=torch.bool), [f"raised: {reason}"] * n
        h = n // 2
        a, ra = _answer(oracle, rows[:h], tuple(c[:h] for c in conds), budget)
        b, rb = _answer(oracle, rows[h:], tuple(c[h:] for c in conds), budget)
        return torch.cat([a, b]), ra + rb


def _rules(x: np.ndarray, ok: np.ndarray, labels: Callable[[int], str]) -> list[str]:
    """Thresholds that separate the failing rows from the answered ones exactly (one coordinate, or the magnitude)."""
    if ok.all() or (~ok).all() or ok.sum() < 2 or (~ok).sum() < 2:
        return []
    feats = {"max |x|": np.abs(x).max(axis=1), "rms(x)": np.sqrt((x ** 2).mean(axis=1))}
    if x.shape[1] <= 64:
        feats.update({labels(j): x[:, j] for j in range(x.shape[1])})
    rules = []
    for name, f in feats.items():
        good, bad = f[ok], f[~ok]
        if bad.min() > good.max():
            rules.append((float(bad.min() - good.max()) / (np.ptp(f) or 1), f"{name} > {0.5 * (bad.min() + good.max()):.4g}"))
        elif bad.max() < good.min():
            rules.append((float(good.min() - bad.max()) / (np.ptp(f) or 1), f"{name} < {0.5 * (bad.max() + good.min()):.4g}"))
    return [r for _, r in sorted(rules, reverse=True)[:3]]


def input_range(subject: Subject, scales: Sequence[float] = (0.01, 0.1, 0.3, 1.0, 3.0), per_scale: int = 64,
                box: Optional[tuple[float, float]] = None, seed: int = 0, max_bisect: int = 64,
                label: Optional[Callable[[int], str]] = None, examples: int = 3) -> dict[str, Any]:
    """Which rows the oracle cannot answer: the current rows, then ``per_scale`` rows at each noise scale.

    Rows at scale ``s`` are current rows plus Gaussian noise of ``s`` times the rows' RMS in every value (plus,
    with ``box=(lo, hi)``, uniform rows in that box). A call that raises is cut in halves until the failing rows
    are found (at most ``max_bisect`` extra calls; then the whole part counts as failed). Returns per scale the
    rows and failures, the first few failing rows with their inputs and reason, and ``rules``: thresholds on
    one input coordinate (or on the row's magnitude) that separate failing from answered rows exactly.
    """
    oracle = subject.oracle
    g = torch.Generator().manual_seed(seed)
    rows = subject.rows
    flat = rows.reshape(rows.shape[0], -1)
    rms = float(flat.double().pow(2).mean().sqrt()) or 1.0
    groups: list[tuple[str, torch.Tensor, torch.Tensor]] = [("current rows", rows, torch.arange(rows.shape[0]))]
    for s in scales:
        idx = torch.randint(0, rows.shape[0], (per_scale,), generator=g)
        noise = torch.randn((per_scale, *rows.shape[1:]), generator=g, dtype=torch.float64) * (s * rms)
        groups.append((f"noise {s:g} x rms", (rows[idx].double() + noise).to(rows.dtype), idx))
    if box is not None:
        lo, hi = box
        idx = torch.randint(0, rows.shape[0], (per_scale,), generator=g)
        u = torch.rand((per_scale, *rows.shape[1:]), generator=g, dtype=torch.float64)
        groups.append((f"uniform in [{lo:g}, {hi:g}]", (lo + (hi - lo) * u).to(rows.dtype), idx))
    budget = [max_bisect]
    table, xs, oks, bad_rows = [], [], [], []
    for name, x, idx in groups:
        conds = tuple(c[idx] for c in subject.conditions)
        ok, reasons = _answer(oracle, x, conds, budget)
        table.append({"rows": name, "n": int(x.shape[0]), "failed": int((~ok).sum())})
        xs.append(x.reshape(x.shape[0], -1).double().numpy())
        oks.append(ok.numpy())
        for i in (~ok).nonzero().flatten().tolist():
            if len(bad_rows) < examples:
                vals = xs[-1][i]
                bad_rows.append({"rows": name, "input": [float(v) for v in vals[:8]], "width": int(vals.size),
                                 "reason": reasons[i]})
    x_all, ok_all = np.concatenate(xs), np.concatenate(oks)
    lab = label or (lambda j: f"x[{j}]")
    return {"groups": table, "rows": int(ok_all.size), "failed": int((~ok_all).sum()), "examples": bad_rows,
            "rules": _rules(x_all, ok_all, lab), "row_rms": rms, "bisect_calls_left": budget[0]}
