"""``bbzo sol``: ZO-SOL -- train a PDE corrector through a non-differentiable PhiFlow solver.

    bbzo sol run --preset demo --out runs/sol-demo          # everything: data, 4 methods, table, plots
    bbzo sol generate --preset small --data-dir runs/sol-data
    bbzo sol train --method zo --preset small --out runs/sol-small
    bbzo sol eval --out runs/sol-small                       # every method trained in that folder

Settings come from a preset (``demo``: ~5 min on 2 CPU cores; ``small``: the CPU benchmark; ``paper``:
DeepZero Appendix H for a GPU machine), then a ``--config`` file (flat keys, as the flags), then flags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import click

from bbzo.config import config_option, write_resolved_config
from bbzo.errors import ConfigError

_DATA_KEYS = ("nx", "ny", "factor", "warmup", "frames", "poke")


def _floats(text: Optional[str], name: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return tuple(float(x) for x in text)
    try:
        vals = tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated numbers, e.g. 97.7,390.6", param_hint=name) from None
    if not vals:
        raise click.BadParameter("give at least one value", param_hint=name)
    return vals


def sol_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Every SOL setting as a flag (default: the preset's value)."""
    opts = [
        click.option("--preset", type=click.Choice(["demo", "small", "paper"]), default="demo", show_default=True,
                     help="Base settings: demo (~5 min CPU), small (CPU benchmark), paper (Appendix H, GPU)."),
        click.option("--train-re", type=click.UNPROCESSED,
                     help="Training Reynolds numbers, comma-separated (paper: 97.7,...,3125); a list in --config."),
        click.option("--test-re", type=click.UNPROCESSED, help="Held-out test Reynolds numbers, comma-separated."),
        click.option("--nx", type=int, help="Solver grid cells along x (paper 32); ny = 2 nx unless --ny."),
        click.option("--ny", type=int, help="Solver grid cells along y (paper 64)."),
        click.option("--factor", type=int, help="High-fidelity grid = factor x solver grid (power of 2; paper 2)."),
        click.option("--warmup", type=int, help="Reference steps discarded before recording (the wake must shed)."),
        click.option("--frames", type=int, help="Reference frames recorded per Re."),
        click.option("--poke", type=float, help="Sideways velocity kick that starts the shedding."),
        click.option("--corrector", type=click.Choice(["tiny", "small", "mercury"]),
                     help="tiny 2,618 / small 8,434 / mercury 56,898 parameters (the paper's)."),
        click.option("--unroll", type=int, help="Solver steps per training rollout (paper 16)."),
        click.option("--batch", type=int, help="Rollouts per training step."),
        click.option("--steps", type=int, help="Training steps (ZO-SOL and FO-SOL)."),
        click.option("--lr", type=float, help="Adam learning rate of ZO-SOL (and FO-SOL unless --fo-lr)."),
        click.option("--fo-lr", type=float, help="Adam learning rate of FO-SOL."),
        click.option("--sparsity", type=float, help="ZO-SOL gradient sparsity (paper 0.95)."),
        click.option("--score", help="Pruning score for the layer-wise ratios (bbzo prune --list)."),
        click.option("--score-q", type=int, help="Directions per RGE estimate of the score (zo_grasp: 192)."),
        click.option("--resample-every", type=int, help="Redraw the sparse coordinate set every N steps."),
        click.option("--mu", type=float, help="Finite-difference step of CGE."),
        click.option("--sets-per-call", type=int, help="Perturbed correctors per PhiFlow batch (batch = this x --batch)."),
        click.option("--init", type=click.Choice(["scratch", "non"]),
                     help="ZO-SOL / FO-SOL start: scratch (paper) or the trained NON corrector (train non first)."),
        click.option("--non-steps", type=int, help="Training steps of NON."),
        click.option("--non-batch", type=int, help="Pairs per NON step."),
        click.option("--checkpoint-every", type=int, help="Checkpoint every N training steps."),
        click.option("--non-lr", type=float, help="Adam learning rate of NON."),
        click.option("--eval-steps", type=int, help="Evaluation rollout length (0: every recorded frame)."),
        click.option("--backend", type=click.Choice(["torch", "numpy"]),
                     help="PhiFlow backend of the black-box solver (numpy: no graph can exist)."),
        click.option("--seed", type=int),
        click.option("--device", help="cpu, cuda, cuda:1, ..."),
        click.option("--data-dir", type=click.Path(path_type=Path),
                     help="Cache of reference data (default: runs/sol-data)."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def build_config(kw: dict[str, Any]) -> tuple[Any, Path]:
    """Preset + flags -> ``SolConfig`` and the data folder."""
    from bbzo.tasks.sol import SolConfig, preset

    over: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for k in ("train_re", "test_re"):
        v = _floats(kw.get(k), "--" + k.replace("_", "-"))
        if v is not None:
            data[k] = v
    for k in _DATA_KEYS:
        if kw.get(k) is not None:
            data[k] = kw[k]
    if kw.get("nx") is not None and kw.get("ny") is None:
        data["ny"] = 2 * kw["nx"]
    for k in ("corrector", "unroll", "batch", "steps", "lr", "fo_lr", "sparsity", "score", "score_q",
              "resample_every", "mu", "sets_per_call", "init", "non_steps", "non_batch", "non_lr", "eval_steps",
              "checkpoint_every", "backend", "seed", "device"):
        if kw.get(k) is not None:
            over[k] = kw[k]
    if kw.get("backend") is not None:
        data["backend"] = kw["backend"]
    cfg: SolConfig = preset(kw.get("preset") or "demo", data=data, **over)
    return cfg, Path(kw.get("data_dir") or "runs/sol-data")


@click.group("sol")
def sol() -> None:
    """ZO-SOL: train a PDE corrector through a non-differentiable PhiFlow solver (DeepZero §6.2)."""


@sol.command("generate")
@config_option
@sol_options
@click.option("--force", is_flag=True, help="Regenerate even if cached data exists.")
def generate_cmd(config: str, force: bool, **kw: Any) -> None:
    """Make (or reuse) the high-fidelity reference data: warm-up, record, downsample, cache."""
    from bbzo.tasks.sol_data import _paths, generate

    cfg, data_dir = build_config(kw)
    data = generate(cfg.data, data_dir, progress=not kw["no_progress"], force=force, device=cfg.device)
    npz, meta = _paths(cfg.data, data_dir)
    click.echo(f"reference data: {npz}  (train {tuple(data.train.shape)}, test {tuple(data.test.shape)})")
    if data.meta:
        click.echo(f"generated in {data.meta.get('generate_seconds')} s; wake probe amplitude per Re: "
                   f"{data.meta.get('wake_probe_amplitude')}")


@sol.command("train")
@config_option
@sol_options
@click.option("--method", type=click.Choice(["zo", "fo", "non", "src"]), default="zo", show_default=True,
              help="zo = ZO-SOL (black box), fo = FO-SOL (white-box reference), non = supervised one-step, src = none.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/sol"), show_default=True,
              help="Run folder; each method trains into OUT/METHOD.")
@click.option("--resume", is_flag=True, help="Continue from OUT/METHOD/checkpoint.pt.")
def train_cmd(config: str, method: str, out: Path, resume: bool, **kw: Any) -> None:
    """Train one method (data generated first if it is not cached)."""
    import torch

    from bbzo.tasks.sol import train_method
    from bbzo.tasks.sol_data import generate

    torch.set_num_threads(1)
    cfg, data_dir = build_config(kw)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg, data_dir)
    data = generate(cfg.data, data_dir, progress=not kw["no_progress"], device=cfg.device)
    res = train_method(method, cfg, data, out, resume=resume, progress=not kw["no_progress"])
    write_resolved_config(click.get_current_context(), out / method if method != "src" else out)
    click.echo(json.dumps(res, indent=1))


#: Settings that may change between a run and its resume or evaluation (they do not change what is learnt
#: per step): extend a run with --resume --steps N, move it to another device, evaluate longer.
RUNTIME_KEYS = {"steps", "non_steps", "eval_steps", "checkpoint_every", "device", "backend"}


def _check_config(out: Path, cfg: Any, data_dir: Path) -> None:
    """One run folder = one setting: refuse to mix methods trained on different settings.
    Also records where the run's reference data lives (for `bbzo sol eval`)."""
    path = out / "config.json"
    new = json.loads(json.dumps(cfg.to_dict()))
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(new) if k not in RUNTIME_KEYS and old.get(k) != new.get(k))
        if diff:
            raise ConfigError(f"{out} holds a run with other settings (differs in: {', '.join(diff)}). "
                              "Use another --out, or the same settings.")
    path.write_text(json.dumps(new, indent=1))
    (out / "data.json").write_text(json.dumps({"data_dir": str(data_dir.resolve()), "key": cfg.data.key()}, indent=1))


@sol.command("eval")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/sol"), show_default=True,
              help="Run folder written by `bbzo sol train` / `bbzo sol run`.")
@click.option("--methods", default="src,non,zo,fo", show_default=True,
              help="Methods to evaluate (those not trained in OUT are skipped, src always works).")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="Reference data folder (default: the one the run in OUT was trained on).")
@click.option("--eval-steps", type=int, help="Override the rollout length (0: every recorded frame).")
@click.option("--no-plots", is_flag=True)
def eval_cmd(out: Path, methods: str, data_dir: Optional[Path], eval_steps: Optional[int], no_plots: bool) -> None:
    """Test MAE per Re and overall (JSON + Markdown table) and the pictures, for every trained method."""
    import torch

    from bbzo.tasks.sol import SolConfig, evaluate_run

    torch.set_num_threads(1)
    path = out / "config.json"
    if not path.exists():
        raise ConfigError(f"{out} has no config.json; train there first (`bbzo sol train --out {out}`).")
    cfg = SolConfig.from_dict(json.loads(path.read_text()))
    if data_dir is None:
        rec = out / "data.json"
        data_dir = Path(json.loads(rec.read_text())["data_dir"]) if rec.exists() else Path("runs/sol-data")
    if eval_steps is not None:
        cfg.eval_steps = eval_steps
    wanted = tuple(m.strip() for m in methods.split(",") if m.strip())
    summary = evaluate_run(cfg, out, wanted, data_dir=data_dir, plots=not no_plots)
    click.echo("\n" + summary["table"])
    click.echo(f"\nresults: {out / 'eval.json'}")
    for p in summary["plots"]:
        click.echo(f"plot:    {p}")


@sol.command("run")
@config_option
@sol_options
@click.option("--methods", default="src,non,zo,fo", show_default=True, help="Methods to train and compare.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/sol-demo"), show_default=True)
@click.option("--resume", is_flag=True, help="Continue interrupted trainings in OUT.")
@click.option("--no-plots", is_flag=True)
def run_cmd(config: str, methods: str, out: Path, resume: bool, no_plots: bool, **kw: Any) -> None:
    """Everything: reference data, SRC / NON / ZO-SOL / FO-SOL, the MAE table and the pictures."""
    from bbzo.tasks.sol import run_sol

    cfg, data_dir = build_config(kw)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg, data_dir)
    wanted = tuple(m.strip() for m in methods.split(",") if m.strip())
    summary = run_sol(cfg, out, methods=wanted, data_dir=data_dir, resume=resume,
                      progress=not kw["no_progress"], plots=not no_plots)
    write_resolved_config(click.get_current_context(), out)
    click.echo("\n" + summary["table"])
    click.echo(f"\nresults: {out / 'results.json'}  (total {summary['total_seconds']} s)")
    for p in summary["plots"]:
        click.echo(f"plot:    {p}")
