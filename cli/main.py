"""``bbzo``: the command line. ``bbzo --help`` lists the commands; every option has help text."""

from __future__ import annotations

import re
import sys

import click

import bbzo
from bbzo.cli.check import check_cmd
from bbzo.cli.cifar import cifar
from bbzo.cli.defense import defense
from bbzo.cli.prune import prune
from bbzo.cli.sol import sol
from bbzo.cli.tasks import run_group, task_command
from bbzo.cli.train import train
from bbzo.errors import BbzoError
from bbzo.task import get_task


FIRST_LINE = 300  # characters of an error's first line; the details follow on indented lines


def format_error(message: str, width: int = FIRST_LINE) -> str:
    """``error: <what happened>`` within ``width`` characters, the details (stderr tail, hints) on the lines after."""
    text = " ".join(message.split())
    parts = re.split(r"(?<=[.;)]) (?=[A-Z(|])| (?=\| )", text)
    lines, cur = [], "error:"
    for part in parts:
        if not lines and len(cur) + 1 + len(part) <= width:
            cur = f"{cur} {part}"
            continue
        if not lines:
            lines.append(cur)
            cur = ""
        lines.append("  " + part)
    if not lines:
        return cur
    if lines[0] == "error:":  # the first clause alone is longer than the width: cut it at a word
        clause = lines[1].strip()
        head = clause[: width - 7].rsplit(" ", 1)[0]
        lines = [f"error: {head}", "  " + clause[len(head):].strip(), *lines[2:]]
    return "\n".join(lines)


def _quiet_signals() -> None:
    """The command is ending with its message: a late SIGTERM/SIGINT (a launcher stopping every rank) must not
    replace that message with click's 'Aborted!'."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)


class _Group(click.Group):
    """Turn bbzo's own errors into a clear message and exit code 2 (no traceback): what happened on the
    first line (at most a few hundred characters), the details after it."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except BbzoError as e:
            _quiet_signals()
            click.echo(format_error(str(e)), err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:  # SIGTERM / Ctrl-C: one line saying what is saved (bbzo.signals)
            _quiet_signals()
            text = str(e) or "interrupted (SIGINT)."
            click.echo(format_error(text).replace("error:", "interrupted:", 1), err=True)
            sys.exit(getattr(e, "exit_code", 130))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(bbzo.__version__, prog_name="bbzo")
def main() -> None:
    """Train neural networks through black boxes with zeroth-order gradients (DeepZero)."""


main.add_command(task_command(get_task("projectile"), "demo",
                              help="Train a launch policy through a black-box projectile simulator (data generated here)."))
main.add_command(train)
main.add_command(check_cmd)
main.add_command(prune)
main.add_command(sol)
main.add_command(cifar)
main.add_command(defense)
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
