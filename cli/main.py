"""``bbzo``: the command line. ``bbzo --help`` lists the commands; every option has help text."""

from __future__ import annotations

import sys
from pathlib import Path

import click

import bbzo
from bbzo.cli.prune import prune
from bbzo.cli.sol import sol
from bbzo.cli.train import train
from bbzo.config import config_option, write_resolved_config
from bbzo.errors import BbzoError


class _Group(click.Group):
    """Turn bbzo's own errors into one clear line and exit code 2 (no traceback)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except BbzoError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(bbzo.__version__, prog_name="bbzo")
def main() -> None:
    """Train neural networks through black boxes with zeroth-order gradients (DeepZero)."""


@main.command()
@config_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Run folder: metrics, checkpoints, results table and plots.")
@click.option("--steps", type=int, default=1000, show_default=True, help="Training steps per estimator.")
@click.option("--batch", type=int, default=64, show_default=True, help="Shot requests per minibatch.")
@click.option("--estimators", default="cge,rge", show_default=True,
              help="Comma-separated estimators to compare (RGE gets q = d: the same queries per step).")
@click.option("--lr", type=float, default=0.02, show_default=True, help="Adam learning rate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--resume", is_flag=True, help="Continue from the checkpoints in --out.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(config: str, out: Path, steps: int, batch: int, estimators: str, lr: float, seed: int, device: str,
         resume: bool, no_plots: bool, no_progress: bool) -> None:
    """Train a launch policy through a black-box projectile simulator (data generated here)."""
    from bbzo.tasks.projectile import DemoConfig, run_demo

    cfg = DemoConfig(steps=steps, batch=batch, lr=lr, seed=seed, device=device,
                     estimators=tuple(e.strip() for e in estimators.split(",") if e.strip()))
    summary = run_demo(cfg, out, resume=resume, progress=not no_progress, plots=not no_plots)
    write_resolved_config(click.get_current_context(), out)
    click.echo("\n" + summary["table"])
    click.echo(f"\nresults: {out / 'results.json'}")
    for p in summary["plots"]:
        click.echo(f"plot:    {p}")


main.add_command(train)
main.add_command(prune)
main.add_command(sol)


@main.command("estimators")
def list_estimators_cmd() -> None:
    """List the registered gradient estimators and their query cost per step."""
    for info in bbzo.list_estimators(with_info=True):
        click.echo(f"{info.name:<12} {info.cost:<32} {info.description}")


@main.command("models")
def list_models_cmd() -> None:
    """List the models bbzo can build by name."""
    from bbzo.models import list_models

    for name, desc in list_models(with_description=True):
        click.echo(f"{name:<12} {desc}")


if __name__ == "__main__":
    main()
