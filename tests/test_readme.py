"""The README's promises: its Python quick start is the example file and runs; every `bbzo ...` command it shows
parses against the real CLI (each option exists, each value has its type); the cheap ones run with tiny settings;
every results page and JSON it links to exists."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from bbzo.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
QUICKSTART = ROOT / "examples" / "quickstart" / "train_heater.py"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def bbzo_commands(text: str) -> list[list[str]]:
    """Every ``bbzo ...`` line of the README's bash blocks and every inline `bbzo ...` command, as argument lists."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("bbzo "):
                lines.append(line)
    lines += [m for m in re.findall(r"`(bbzo [^`]+)`", text) if "|" not in m and "..." not in m]
    return [shlex.split(line)[1:] for line in dict.fromkeys(lines)]


def resolve(args: list[str]) -> tuple[click.Command, list[str]]:
    """The command ``bbzo ARGS`` names and its own arguments, parsed as click parses them (options checked)."""
    cmd: click.Command = main
    name = "bbzo"
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        sub = cmd.get_command(click.Context(cmd), args[0])
        assert sub is not None, f"bbzo has no command {' '.join([name, args[0]])!r}"
        name, cmd, args = f"{name} {args[0]}", sub, args[1:]
    with cmd.make_context(name, list(args), resilient_parsing=False) as _:
        pass  # raises click.UsageError for an unknown option or a value of the wrong type
    return cmd, args


def test_the_quick_start_in_the_readme_is_the_example_file_and_it_trains():
    code = QUICKSTART.read_text().split('"""', 2)[2].lstrip("\n")
    assert code.strip() in [b.strip() for b in python_blocks(README)], "README's quick start and the example differ"
    assert len(code.strip().splitlines()) <= 20
    tiny = code.replace("range(300)", "range(5)").replace("make_data(2048)", "make_data(64)")
    r = subprocess.run([sys.executable, "-c", tiny], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.fullmatch(r"MSE [0-9.]+ °C² after 415 queries\n", r.stdout), r.stdout  # 5 steps x 83 queries


def test_every_bbzo_command_in_the_readme_parses():
    commands = bbzo_commands(README)
    assert len(commands) >= 8
    for args in commands:
        if args in (["--help"], ["--version"]):
            continue
        resolve(args)


def test_the_readmes_heater_commands_run_with_tiny_settings(tmp_path):
    ran = 0
    for args in bbzo_commands(README):
        if args[:1] != ["train"] or "examples/custom_simulator/run.yaml" not in args:
            continue
        out = tmp_path / f"run{ran}"
        extra = ["--steps", "2", "--no-progress", "--no-plots", "--out", str(out)]
        own = [a for i, a in enumerate(args) if a != "--out" and (i == 0 or args[i - 1] != "--out")]
        r = subprocess.run([sys.executable, "-m", "bbzo.cli.main", *own, *extra], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        assert (out / "results.json").exists()
        ran += 1
    assert ran >= 2


def test_every_link_in_the_readme_exists():
    links = re.findall(r"\]\(([^)#\s]+)\)", README)
    assert links
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert not missing, missing


@pytest.mark.parametrize("page", sorted((ROOT / "docs" / "results").glob("*.md")), ids=lambda p: p.name)
def test_every_benchmark_json_a_results_page_names_is_committed(page):
    # a command's --out is what it would write (a GPU command not run here may name a file not yet committed)
    names = set(re.findall(r"(?<!--out )benchmarks/results/([\w./-]+\.json)", page.read_text()))
    missing = [n for n in names if not (ROOT / "benchmarks" / "results" / n).exists()]
    assert not missing, missing
