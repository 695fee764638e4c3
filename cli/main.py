"""``bbzo``: the command line. ``bbzo --help`` lists the commands; every option has help text."""

from __future__ import annotations

import re
import sys
from typing import Optional

import click

from bbzo import __version__
from bbzo.errors import BbzoError

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


# name -> (where the command lives, its line in `bbzo --help`). A command's module is imported only when that
# command runs or shows its own help, so `bbzo --help` and `bbzo --version` import neither torch nor any task
# (tests/cli/test_startup.py checks these lines against the commands themselves).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("bbzo.cli.main:demo_command",
             "Train a launch policy through a black-box projectile simulator (data generated here)."),
    "train": ("bbzo.cli.train:train", "Train a model through a black box you plug in: a Python oracle or any program."),
    "check": ("bbzo.cli.check:check_cmd", "Check the gradient estimates through your black box before training."),
    "prune": ("bbzo.cli.prune:prune", "Score MODEL at initialization and write its layer-wise kept fractions at SPARSITY."),
    "sol": ("bbzo.cli.sol:sol", "ZO-SOL: train a PDE corrector through a non-differentiable PhiFlow solver."),
    "cifar": ("bbzo.cli.cifar:cifar", "CIFAR-10 from scratch: DeepZero (Sparse-CGE at ZO-GraSP ratios) and FO / RGE / CGE."),
    "defense": ("bbzo.cli.defense:defense", "Certified black-box defense: a denoiser in front of a query-only classifier."),
    "run": ("bbzo.cli.tasks:run_group", "Run any registered task by name (`bbzo run` lists them)."),
    "estimators": ("bbzo.cli.main:list_estimators_cmd", "List the registered gradient estimators and their query cost."),
    "models": ("bbzo.cli.main:list_models_cmd", "List the models bbzo can build by name."),
}


def load_command(name: str) -> click.Command:
    """The click command ``bbzo NAME`` (its module imported now)."""
    import importlib

    module, attr = COMMANDS[name][0].split(":")
    made = getattr(importlib.import_module(module), attr)
    return made() if not isinstance(made, click.Command) else made


class _Group(click.Group):
    """Turn bbzo's own errors into a clear message and exit code 2 (no traceback): what happened on the
    first line (at most a few hundred characters), the details after it. Commands load when used (COMMANDS)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        return load_command(cmd_name) if cmd_name in COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, line) for n, (_, line) in COMMANDS.items()])

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
@click.version_option(__version__, prog_name="bbzo")
def main() -> None:
    """Train neural networks through black boxes with zeroth-order gradients (DeepZero)."""


def demo_command() -> click.Command:
    """``bbzo demo``: the projectile task's generated command."""
    from bbzo.cli.tasks import task_command
    from bbzo.task import get_task

    return task_command(get_task("projectile"), "demo", help=COMMANDS["demo"][1])


@click.command("estimators")
def list_estimators_cmd() -> None:
    """List the registered gradient estimators and their query cost per step."""
    import bbzo

    for info in bbzo.list_estimators(with_info=True):
        kind = "zeroth-order" if info.zeroth_order else "white-box"
        click.echo(f"{info.name:<12} {kind:<13} {info.cost:<32} {info.description}")


@click.command("models")
def list_models_cmd() -> None:
    """List the models bbzo can build by name."""
    from bbzo.models import list_models

    for name, desc in list_models(with_description=True):
        click.echo(f"{name:<14} {desc}")


if __name__ == "__main__":
    main()
