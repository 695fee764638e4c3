"""The command line starts without the heavy packages: ``bbzo --help`` imports no torch, a command's ``--help``
imports no torchvision / scipy / timm / PhiFlow / matplotlib; the lazy tables match what they stand for.

Timings are benchmarks/startup.py's job (benchmarks/results/startup.json); these tests look at sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click
from click.testing import CliRunner

from bbzo.cli.main import COMMANDS, load_command, main
from bbzo.task import describe_task, get_task, list_tasks
from bbzo.tasks import ALIASES, SHIPPED

HEAVY = ("torchvision", "scipy", "timm", "phi", "phiml", "matplotlib")

PROBE = """
import json, sys
from bbzo.cli.main import main
seen = {}
for argv in json.loads(sys.argv[1]):
    try:
        main(argv, prog_name="bbzo", standalone_mode=False)
    except SystemExit:
        pass
    seen[" ".join(argv)] = sorted({m.split(".")[0] for m in sys.modules})
print("RESULT" + json.dumps(seen))
"""


def imported_after(*commands: list[str]) -> dict[str, set[str]]:
    """Top-level packages in sys.modules after each command, run one after the other in one fresh process."""
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(commands))], capture_output=True, text=True,
                         check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    return {k: set(v) for k, v in json.loads(line[len("RESULT"):]).items()}


def test_help_and_version_import_no_torch_and_command_helps_no_heavy_package():
    cmds = [["--help"], ["--version"], ["defense", "--help"], ["defense", "classifier", "--help"],
            ["defense", "pretrain", "--help"], ["defense", "finetune", "--help"], ["defense", "certify", "--help"],
            ["cifar", "train", "--help"], ["run", "--help"], ["run", "cifar", "--help"], ["train", "--help"],
            ["demo", "--help"], ["prune", "--help"], ["check", "--help"], ["estimators"]]
    seen = imported_after(*cmds)
    assert "torch" not in seen["--help"] and "torch" not in seen["--version"]
    assert "bbzo" in seen["--help"] and "click" in seen["--help"]  # the probe did import what it ran
    for cmd, mods in seen.items():
        assert not mods & set(HEAVY), f"`bbzo {cmd}` imported {sorted(mods & set(HEAVY))}"
    assert "torch" in seen["defense pretrain --help"]  # the settings need torch; torch is the yardstick


def test_every_lazy_command_is_the_command_it_names():
    for name, (_, line) in COMMANDS.items():
        cmd = load_command(name)
        assert isinstance(cmd, click.Command) and cmd.name == name
        assert line.endswith(".") and len(line) <= 110
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and all(f"  {n} " in r.output for n in COMMANDS)
    r = CliRunner().invoke(main, ["nope"])
    assert r.exit_code == 2 and "No such command 'nope'" in r.output


def test_the_shipped_task_table_matches_the_tasks_and_bbzo_run_lists_them_without_importing_them():
    for name, (module, description) in SHIPPED.items():
        task = get_task(name)
        assert name in (task.name, *task.aliases) and task.description == description
        assert task.settings.__module__.startswith(module)  # the table names the module that registers it
    listed = list_tasks()
    assert set(SHIPPED) - set(ALIASES) <= set(listed) and describe_task("cifar") == SHIPPED["cifar"][1]
    for extra in set(listed) - set(SHIPPED):  # a task another test registered with `bbzo run --import` in this process
        assert not get_task(extra).settings.__module__.startswith("bbzo."), extra
    r = CliRunner().invoke(main, ["run", "--help"])
    assert r.exit_code == 0 and all(n in r.output for n in listed)
    r = CliRunner().invoke(main, ["run"])
    assert r.exit_code == 0 and len(r.output.splitlines()) == len(listed)
