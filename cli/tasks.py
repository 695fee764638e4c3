"""Commands generated for tasks: options from the settings dataclass, ``--config``, the run lifecycle.

``task_command(get_task("projectile"), "demo", report)`` is ``bbzo demo``; a new task gets its command
the same way (see ``docs/adding_a_task.md``), and ``bbzo run TASK`` runs any registered task.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

import click

from bbzo.task import Task, describe_task, get_task, list_tasks

from .launch import relaunch_if_needed, reports
from .options import config_option, resolve_command, settings_options

__all__ = ["task_command", "print_results", "run_group"]


def print_results(results: dict[str, Any], settings: Any) -> None:
    """The default report: the results table, where the results are, and every plot."""
    if results.get("table"):
        click.echo("\n" + results["table"])
    click.echo(f"\nresults: {settings.out / 'results.json'}")
    for p in results.get("plots", []):
        click.echo(f"plot:    {p}")


def task_command(task: Task, name: Optional[str] = None, report: Callable[[dict[str, Any], Any], None] = print_results,
                 *, help: Optional[str] = None, exclude: Sequence[str] = ()) -> click.Command:
    """A click command that runs ``task`` with settings from flags, ``--config`` and presets."""

    @click.command(name or task.name, help=help or _sentence(task.description))
    @config_option
    @settings_options(task.settings, exclude=exclude)
    @click.pass_context
    def command(ctx: click.Context, config: Optional[str], **_: Any) -> None:
        from bbzo.run import run_task

        settings, sources = resolve_command(ctx, task.settings)
        relaunch_if_needed(settings)
        results = run_task(task, settings, sources, command=" ".join(["bbzo", *sys.argv[1:]]))
        if reports():
            report(results, settings)

    return command


def _import_tasks(ctx: click.Context) -> None:
    """Import the modules named by ``--import`` (they register their tasks)."""
    from bbzo.references import load_object

    for ref in (ctx.params.get("imports") or ()):
        load_object(f"{ref}:__name__")  # a module or file reference; importing it registers its tasks


class _TaskGroup(click.Group):
    """``bbzo run TASK``: one generated command per registered task, built when asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        _import_tasks(ctx)
        return list_tasks()

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        _import_tasks(ctx)
        if cmd_name not in list_tasks():
            return None
        return task_command(get_task(cmd_name))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The task list of ``bbzo run --help``, from the descriptions (no task is imported to list it)."""
        names = self.list_commands(ctx)
        if names:
            with formatter.section("Commands"):
                formatter.write_dl([(n, _sentence(describe_task(n))) for n in names])


def _sentence(text: str) -> str:
    return f"{text[:1].upper()}{text[1:]}."


@click.group("run", cls=_TaskGroup, invoke_without_command=True)
@click.option("--import", "imports", multiple=True, metavar="MODULE|FILE.py",
              help="Import this module or file first (it registers its tasks), e.g. examples/new_task/fit_task.py.")
@click.pass_context
def run_group(ctx: click.Context, imports: tuple[str, ...]) -> None:
    """Run any registered task by name (`bbzo run` lists them; `bbzo run TASK --help` shows its settings)."""
    if ctx.invoked_subcommand is None:
        _import_tasks(ctx)
        for n in list_tasks():
            click.echo(f"{n:<18} {describe_task(n)}")
