"""ZO-SOL at CPU scale over seeds: test MAE of SRC / NON / NOG / ZO-SOL / FO-SOL on held-out Re. Prints JSON.

Runs the ``sol`` task with the ``small`` preset for every seed of ``--seeds`` (the seed drives the corrector
init, the batches, the ZO-GraSP score and the sparse draws, for every method), each in ``RUN_DIR/seed<k>``,
on data it generates once (cached in ``--data-dir``), and writes per method the MAE of every seed, the
mean, the sample std and the range, the per-Re means, the costs, the **paired** per-seed gaps of every
zeroth-order method against NON and NOG, the settings, the command, the git commit and the versions to
``--out-json`` (and a plot of the spread next to it).

**One job per (method, seed), cached.** Each job runs in its own process (one torch thread), trains one
method in its own run folder ``RUN_DIR/seed<k>/<method>``, evaluates it and writes ``bench.json`` there: its test and
validation MAE, its training summary, the settings it ran with and the commit it ran at. A rerun reuses
every cached job whose settings match (and, for methods that fine-tune NON, whose NON corrector is the one
it started from), so adding a method -- ``--methods src,non,nog,zo,fo,hybrid`` once ``hybrid`` is a method
of ``bbzo sol`` -- runs only that method. A job's key holds every setting except folders, display and the
settings only another method reads (``bbzo.tasks.sol.METHOD_SETTINGS``: a new method's own settings
belong there); a setting added to bbzo since a job ran matches at its default. ``--jobs 2`` runs two jobs
side by side; a method that fine-tunes NON waits for that seed's NON. ``--fresh`` ignores the cache.
Override any setting with KEY=VALUE (JSON values), e.g. ``steps=600``: an override reruns what it touches.
The JSON records the commit of every method's jobs (``commits_per_method``) beside the driver's.

    .venv/bin/python benchmarks/sol_small.py --seeds 0,1,2 --jobs 2 --run-dir runs/sol-small-seeds --plots \\
        --out-json benchmarks/results/sol_small.json

Paper (full scale, GPU): SRC 0.180, NON 0.153, ZO-SOL 0.119, FO-SOL 0.074.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from common import emit  # benchmarks/ is on sys.path when run as a script

PAPER = {"src": 0.180, "non": 0.153, "zo": 0.119, "fo": 0.074}
#: The baselines every zeroth-order method is paired against, seed by seed.
BASELINES = ("non", "nog")
#: Settings that decide nothing about a result (where it lives, how it is shown).
NOT_IN_KEY = ("methods", "out", "data_dir", "no_progress", "no_plots", "resume", "overwrite", "checkpoint_every",
              "workers", "worker_timeout")
CACHE = "bench.json"


# ---------------------------------------------------------------------------- one job: (seed, method)
def _settings(args: argparse.Namespace, seed: int, over: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    from bbzo.config import resolve
    from bbzo.tasks.sol import SolSettings

    return resolve(SolSettings, {"preset": args.preset, "out": args.run_dir / f"seed{seed}", "data_dir": args.data_dir,
                                 "methods": tuple(args.methods.split(",")), "no_progress": True,
                                 "no_plots": not args.plots, "seed": seed, **over})


def settings_key(s: Any, method: str) -> dict[str, Any]:
    """The settings that decide ``method``'s result: everything but folders, display and the settings only
    another method reads (``METHOD_SETTINGS``: NOG's learning rate does not touch NON's result)."""
    from bbzo.config import as_plain
    from bbzo.tasks.sol import METHOD_SETTINGS

    others = {k for m, keys in METHOD_SETTINGS.items() if m != method for k in keys} - set(METHOD_SETTINGS.get(method, ()))
    return {k: v for k, v in as_plain(s).items() if k not in NOT_IN_KEY and k not in others}


def same_settings(cached_key: dict[str, Any], key: dict[str, Any]) -> bool:
    """Whether a cached job ran with ``key``. A setting the cache lacks (added to bbzo since) matches only
    at its default: a new setting at its default cannot have changed an older result."""
    from bbzo.config import setting_infos
    from bbzo.tasks.sol import SolSettings

    defaults = json.loads(json.dumps({i.name: i.default for i in setting_infos(SolSettings)}, default=str))
    key = json.loads(json.dumps(key, default=str))
    if set(cached_key) - set(key):
        return False  # a setting it ran with no longer exists
    return all(cached_key.get(k, defaults.get(k)) == v for k, v in key.items())


def _needs_non(s: Any, method: str) -> bool:
    return s.init == "non" and method not in ("src", "non")


def _sha256(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def cached(s: Any, seed_dir: Path, method: str) -> Optional[dict[str, Any]]:
    """The cached result of ``method`` in ``seed_dir``, or None if missing or made with other settings/start."""
    path = seed_dir / method / CACHE
    try:
        entry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(entry.get("settings"), dict) or not same_settings(entry["settings"], settings_key(s, method)):
        return None
    if _needs_non(s, method) and entry.get("init_from") != _sha256(seed_dir / "non" / "corrector.pt"):
        return None  # NON was retrained since: what this method fine-tuned is gone
    if method != "src" and entry.get("corrector") != _sha256(seed_dir / method / "corrector.pt"):
        return None
    return entry


def run_job(args: argparse.Namespace, seed: int, method: str, over: dict[str, Any]) -> dict[str, Any]:
    """Train ``method`` for ``seed`` (in this process, 1 torch thread), evaluate it, cache the result.

    Each job is a run folder of its own, ``RUN_DIR/seed<k>/<method>`` (one training in the folder itself:
    ``corrector.pt``, ``metrics.jsonl``, ``lpr.json``, ``run.json``, ``config.resolved.yaml``), so jobs whose
    method-only settings differ never share a run record; a method that fine-tunes NON gets a copy of the
    seed's ``non/corrector.pt`` in ``<method>/non/`` (where ``init="non"`` looks), and its hash is recorded.
    """
    import dataclasses
    import shutil

    from bbzo.provenance import provenance
    from bbzo.run import run_task
    from bbzo.tasks.sol import TASK, build_method, evaluate, load, load_corrector

    prov = provenance()
    s, sources = _settings(args, seed, over)
    seed_dir = Path(s.out)
    folder = seed_dir / method
    t0 = time.perf_counter()
    init_from = None
    if _needs_non(s, method):
        start = seed_dir / "non" / "corrector.pt"
        init_from = _sha256(start)
        (folder / "non").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(start, folder / "non" / "corrector.pt")
    corrector = None
    if method == "src":
        train: dict[str, Any] = {"method": "src", "steps": 0}
    else:
        one = dataclasses.replace(TASK, build=lambda st, _name, ctx: build_method(st, method, ctx))
        train = run_task(one, dataclasses.replace(s, out=folder), sources, trainings=[""], evaluate=False)["trainings"][""]
        train["method"] = method
    data = load(s.data, s.data_dir)
    if method != "src":
        corrector = load_corrector(s, data, folder / "corrector.pt").eval()
    ev = evaluate(s, data, corrector, keep_states=args.plots)
    states = ev.pop("states", None)
    if s.validate:  # long rollouts on the training Re: what settings may be chosen by (never the test Re)
        ev["val_mae"] = evaluate(s, data, corrector, split="train")["mae"]
    entry = {"seed": seed, "method": method, "eval": ev, "train": train, "seconds": round(time.perf_counter() - t0, 1),
             "settings": settings_key(s, method), "init_from": init_from,
             "corrector": None if method == "src" else _sha256(folder / "corrector.pt"), "provenance": prov}
    folder.mkdir(parents=True, exist_ok=True)
    if states is not None:  # for the seed's pictures, drawn once every method of the seed is done
        import torch

        torch.save(states, folder / "eval_states.pt")
    (folder / CACHE).write_text(json.dumps(entry, indent=1, default=str) + "\n")
    return entry


def plot_seed(s: Any, seed_dir: Path, results: dict[str, dict[str, Any]], data: Any) -> list[Path]:
    """The task's pictures (vorticity, MAE over time) of one seed, from every method's cached evaluation."""
    import torch

    from bbzo.tasks.sol import plot_results

    evals = {}
    for m, r in results.items():
        ev = dict(r["eval"])
        path = seed_dir / m / "eval_states.pt"
        if path.exists():
            ev["states"] = torch.load(path, weights_only=True)
        evals[m] = ev
    return plot_results(s, data, evals, seed_dir)


# ---------------------------------------------------------------------------- the summary
def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": round(statistics.fmean(values), 5),
            "std": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0,
            "min": round(min(values), 5), "max": round(max(values), 5)}


def paired(per_seed: dict[int, dict[str, Any]], zo: str, base: str) -> dict[str, Any]:
    """``base`` - ``zo`` test MAE seed by seed (positive: the ZO method is better), its spread and sign count."""
    seeds = sorted(per_seed)
    gaps = [per_seed[s]["eval"][base]["mae"] - per_seed[s]["eval"][zo]["mae"] for s in seeds]
    mean_gap = statistics.fmean(per_seed[s]["eval"][base]["mae"] for s in seeds) - \
        statistics.fmean(per_seed[s]["eval"][zo]["mae"] for s in seeds)
    return {"paired_gap_per_seed": {str(s): round(d, 5) for s, d in zip(seeds, gaps)}, "paired_gap": _spread(gaps),
            "better_in_seeds": f"{sum(d > 0 for d in gaps)}/{len(seeds)}", "gap_of_means": round(mean_gap, 5)}


def summarize(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per method: every seed's test MAE, mean, sample std, range; per-Re means; paired gaps; the goals."""
    seeds = sorted(per_seed)
    methods = list(per_seed[seeds[0]]["eval"])
    test_mae: dict[str, Any] = {}
    per_re: dict[str, Any] = {}
    for m in methods:
        vals = {s: per_seed[s]["eval"][m]["mae"] for s in seeds}
        test_mae[m] = {**_spread(list(vals.values())), "seeds": {str(s): v for s, v in vals.items()}}
        res = list(per_seed[seeds[0]]["eval"][m]["mae_per_re"])
        per_re[m] = {r: round(statistics.fmean(per_seed[s]["eval"][m]["mae_per_re"][r] for s in seeds), 5) for r in res}
    out: dict[str, Any] = {"test_mae": test_mae, "test_mae_per_re_mean": per_re}
    if all("val_mae" in per_seed[s]["eval"][m] for s in seeds for m in methods):  # what settings were chosen by
        out["val_mae"] = {m: {**_spread([per_seed[s]["eval"][m]["val_mae"] for s in seeds]),
                              "seeds": {str(s): round(per_seed[s]["eval"][m]["val_mae"], 6) for s in seeds}}
                          for m in methods}
    if "src" in test_mae:
        src = test_mae["src"]["mean"]
        out["vs_src_mean"] = {m: round(v["mean"] / src - 1, 4) for m, v in test_mae.items()}
    zeroth = [m for m in methods if per_seed[seeds[0]]["train"].get(m, {}).get("zeroth_order")]
    out["zeroth_order_methods"] = zeroth
    out["paired_gaps"] = {f"{z}_vs_{b}": paired(per_seed, z, b) for z in zeroth for b in BASELINES if b in methods}
    if {"non", "zo"} <= set(test_mae):  # the format of the earlier runs
        gap = test_mae["non"]["mean"] - test_mae["zo"]["mean"]
        spread = max(test_mae["non"]["std"], test_mae["zo"]["std"])
        p = out["paired_gaps"]["zo_vs_non"]
        out["zo_vs_non"] = {"gap": round(gap, 5), "larger_std": spread, "gap_over_spread": round(gap / spread, 2)
                            if spread else None, "zo_better_in_seeds": p["better_in_seeds"],
                            "paired_gap_per_seed": p["paired_gap_per_seed"], "paired_gap": p["paired_gap"]}
    goals: dict[str, Any] = {}
    if set(PAPER) <= set(test_mae):
        means = [test_mae[m]["mean"] for m in ("src", "non", "zo", "fo")]
        goals.update({"ordering_src_non_zo_fo": means == sorted(means, reverse=True),
                      "zo_at_most_0.75_src": test_mae["zo"]["mean"] <= 0.75 * test_mae["src"]["mean"],
                      "gap_larger_than_spread": bool(out["zo_vs_non"]["gap"] > out["zo_vs_non"]["larger_std"])})
    bases = [b for b in BASELINES if b in methods]
    if zeroth and bases:  # issue 33: the best ZO method beats NON and NOG in the mean and in every seed
        best = min(zeroth, key=lambda m: test_mae[m]["mean"])
        gaps = [out["paired_gaps"][f"{best}_vs_{b}"] for b in bases]
        goals["best_zo_method"] = best
        goals["best_zo_beats_" + "_and_".join(bases) + "_in_the_mean"] = all(g["gap_of_means"] > 0 for g in gaps)
        goals["best_zo_beats_" + "_and_".join(bases) + "_in_every_seed"] = all(
            g["better_in_seeds"] == f"{len(seeds)}/{len(seeds)}" for g in gaps)
    if goals:
        out["goals"] = goals
    return out


def _names() -> dict[str, str]:
    from bbzo.tasks.sol import METHOD_NAMES

    return METHOD_NAMES


def table(summary: dict[str, Any]) -> str:
    names = _names()
    seeds = list(next(iter(summary["test_mae"].values()))["seeds"])
    head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | vs SRC | paper |"
    rows = [head, "|" + "---|" * (len(seeds) + 4)]
    for m, v in summary["test_mae"].items():
        rel = summary.get("vs_src_mean", {}).get(m)
        rows.append(f"| {names.get(m, m)} | " + " | ".join(f"{v['seeds'][s]:.4f}" for s in seeds)
                    + f" | **{v['mean']:.4f} ± {v['std']:.4f}** | {'-' if rel is None else f'{100 * rel:+.1f}%'} | "
                    f"{PAPER.get(m, '-')} |")
    return "\n".join(rows)


def gap_table(summary: dict[str, Any]) -> str:
    """Paired gaps ``baseline - ZO method`` per seed (test MAE; positive: the ZO method is better)."""
    names = _names()
    seeds = list(next(iter(summary["test_mae"].values()))["seeds"])
    rows = ["| ZO method | against | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | better in |",
            "|" + "---|" * (len(seeds) + 4)]
    for key, g in summary.get("paired_gaps", {}).items():
        z, b = key.split("_vs_")
        rows.append(f"| {names.get(z, z)} | {names.get(b, b)} | "
                    + " | ".join(f"{g['paired_gap_per_seed'][s]:+.5f}" for s in seeds)
                    + f" | **{g['paired_gap']['mean']:+.5f} ± {g['paired_gap']['std']:.5f}** | {g['better_in_seeds']} |")
    return "\n".join(rows)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {**_names(), "fo": "FO-SOL\n(white-box)", "nog": "NOG\n(no solver grad.)"}
    fig, ax = plt.subplots(figsize=(1.3 * len(summary["test_mae"]) + 1.2, 3.8))
    for i, (m, v) in enumerate(summary["test_mae"].items()):
        ax.bar(i, v["mean"], yerr=v["std"], capsize=6, color="C%d" % i, alpha=0.6)
        ax.scatter([i] * len(v["seeds"]), list(v["seeds"].values()), color="k", s=14, zorder=3)
    ax.set_xticks(range(len(summary["test_mae"])), [names.get(m, m) for m in summary["test_mae"]], fontsize=8)
    ax.set_ylabel("test MAE (held-out Re)")
    ax.set_title(f"ZO-SOL at CPU scale: mean ± std over {len(v['seeds'])} seeds (dots: each seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- the driver
def _order(methods: list[str]) -> list[str]:
    """NON first (the others may fine-tune it), SRC last (cheap), the rest as given."""
    return sorted(methods, key=lambda m: (m != "non", m == "src", methods.index(m)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--jobs", type=int, default=1, help="(method, seed) jobs side by side (one process and torch "
                    "thread each)")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/sol-small"))
    ap.add_argument("--data-dir", type=Path, default=Path("runs/sol-data"))
    ap.add_argument("--out-json", type=Path)
    ap.add_argument("--methods", default="src,non,nog,zo,hybrid,fo")
    ap.add_argument("--fresh", action="store_true", help="rerun every job (ignore the cached bench.json files)")
    ap.add_argument("--plots", action="store_true", help="also draw each seed's vorticity and MAE plots")
    ap.add_argument("--one-job", help=argparse.SUPPRESS)  # a worker: SEED:METHOD
    ap.add_argument("set", nargs="*", help="KEY=VALUE overrides of the preset (JSON values), e.g. steps=200")
    args = ap.parse_args()
    over = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}

    import torch

    torch.set_num_threads(1)
    if args.one_job is not None:
        seed, method = args.one_job.split(":")
        print(json.dumps(run_job(args, int(seed), method, over), default=str))
        return

    from bbzo.config import as_plain
    from bbzo.provenance import provenance
    from bbzo.tasks.sol import generate

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m for m in args.methods.split(",") if m.strip()]
    prov = provenance()  # the code that runs: taken before the jobs start, not after
    t0 = time.perf_counter()
    s0, _ = _settings(args, seeds[0], over)  # validates the methods and overrides before anything runs
    data = generate(s0.data, s0.data_dir, progress=False)  # once, before the workers share the cache
    data_s = round(time.perf_counter() - t0, 1)
    results: dict[tuple[int, str], dict[str, Any]] = {}
    settings = {s: _settings(args, s, over)[0] for s in seeds}
    pending = []
    for m in _order(methods):
        for s in seeds:
            hit = None if args.fresh else cached(settings[s], Path(settings[s].out), m)
            if hit is not None:
                results[(s, m)] = hit
            else:
                pending.append((s, m))
    reused = set(results)
    if reused:
        print(f"cached: {', '.join(f'{m}@{s}' for s, m in sorted(reused))}", file=sys.stderr, flush=True)
    base = [sys.executable, __file__, "--preset", args.preset, "--run-dir", str(args.run_dir), "--data-dir",
            str(args.data_dir), "--methods", args.methods, *(["--plots"] if args.plots else []), *args.set]
    running: dict[tuple[int, str], tuple[subprocess.Popen, Any]] = {}
    while pending or running:
        for job in list(pending):
            if len(running) >= max(1, args.jobs):
                break
            s, m = job
            if _needs_non(settings[s], m) and "non" in methods and (s, "non") not in results:
                continue  # this seed's NON is not trained yet
            pending.remove(job)
            log = args.run_dir / f"seed{s}-{m}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            f = log.open("w")
            running[job] = (subprocess.Popen([*base, "--one-job", f"{s}:{m}"], stdout=subprocess.PIPE, stderr=f,
                                             text=True), f)
        for (s, m), (p, f) in list(running.items()):
            if p.poll() is None:
                continue
            out = p.stdout.read() if p.stdout else ""
            f.close()
            del running[(s, m)]
            if p.returncode != 0:
                for q, _ in running.values():
                    q.terminate()
                sys.exit(f"{m} for seed {s} failed (exit {p.returncode}); see {args.run_dir / f'seed{s}-{m}.log'}. "
                         "Finished jobs are cached: rerun the same command to go on.")
            results[(s, m)] = json.loads(out.strip().splitlines()[-1])
            print(f"seed {s}: {m} {results[(s, m)]['eval']['mae']:.4f} ({results[(s, m)]['seconds']} s)",
                  file=sys.stderr, flush=True)
        if running:
            time.sleep(1.0)
    per_seed = {s: {"eval": {m: results[(s, m)]["eval"] for m in methods},
                    "train": {m: results[(s, m)]["train"] for m in methods}} for s in seeds}
    if args.plots:
        for s in seeds:
            plot_seed(settings[s], Path(settings[s].out), {m: results[(s, m)] for m in methods}, data)
    summary = summarize(per_seed)
    commits: dict[str, list[str]] = {}
    for (s, m), r in sorted(results.items()):
        c = r["provenance"].get("commit") or "unknown"
        c += "+dirty" if r["provenance"].get("dirty") else ""
        commits.setdefault(m, [])
        if c not in commits[m]:
            commits[m].append(c)
    result: dict[str, Any] = {
        "benchmark": "sol_small",
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "seeds": seeds,
        **summary,
        "train": {str(s): {m: {k: t.get(k) for k in ("steps", "queries", "score_queries", "queries_per_step",
                                                      "oracle_rows", "solver_state_steps", "wall_s", "final_train_loss",
                                                      "estimator", "zeroth_order")
                               if k in t} for m, t in r["train"].items()} for s, r in per_seed.items()},
        "job_seconds": {f"{m}@{s}": r["seconds"] for (s, m), r in sorted(results.items())},
        "reused_from_cache": sorted(f"{m}@{s}" for s, m in reused),
        "commits_per_method": commits,
        "data_seconds": data_s, "total_seconds": round(time.perf_counter() - t0, 1),
        "jobs": args.jobs, "config": {k: v for k, v in as_plain(s0).items() if k not in NOT_IN_KEY and k != "seed"},
        "data_meta": data.meta, "paper_full_scale": PAPER, "provenance": prov,
    }
    result["table"] = table(summary)
    result["paired_gap_table"] = gap_table(summary)
    if args.out_json:
        result["plot"] = str(plot(summary, args.out_json.with_suffix(".png")))
    emit(result, args.out_json)


if __name__ == "__main__":
    main()
