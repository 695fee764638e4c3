"""``bbzo``: the command line. ``bbzo --help`` lists the commands; every option has help text."""

from __future__ import annotations

import sys

import click

import bbzo
from bbzo.cli.prune import prune
from bbzo.cli.sol import sol
from bbzo.cli.tasks import run_group, task_command
from bbzo.cli.train import train
from bbzo.errors import BbzoError
from bbzo.task import get_task


class _Group(click.Group):
    """Turn bbzo's own errors into one clear line and exit code 2 (no traceback)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except BbzoError as e:
            first, *rest = str(e).split("\n", 1)
            click.echo(f"error: {first}", err=True)
            if rest:
                click.echo(rest[0], err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(bbzo.__version__, prog_name="bbzo")
def main() -> None:
    """Train neural networks through black boxes with zeroth-order gradients (DeepZero)."""


main.add_command(task_command(get_task("projectile"), "demo",
                              help="Train a launch policy through a black-box projectile simulator (data generated here)."))
main.add_command(train)
main.add_command(prune)
main.add_command(sol)
main.add_command(run_group)


@main.command("estimators")
def list_estimators_cmd() -> None:
    """List the registered gradient estimators and their query cost per step."""
    for info in bbzo.list_estimators(with_info=True):
        kind = "zeroth-order" if info.zeroth_order else "white-box"
        click.echo(f"{info.name:<12} {kind:<13} {info.cost:<32} {info.description}")


@main.command("models")
def list_models_cmd() -> None:
    """List the models bbzo can build by name."""
    from bbzo.models import list_models

    for name, desc in list_models(with_description=True):
        click.echo(f"{name:<14} {desc}")


if __name__ == "__main__":
    main()
