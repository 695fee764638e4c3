"""``certify.tsv`` / ``predict.tsv``: one row per image, appended durably, read back to resume.

Every row is written, flushed and fsynced as soon as its image is certified, so an interruption (Ctrl-C,
a scheduler's SIGTERM, a crash, a power cut) loses at most the image in flight. ``--resume`` reads the rows
back, drops a torn last line (an interruption in the middle of a write), checks that they are the first
images of this run's plan, in order, and continues with the next image. Each image's noise comes from its
own generator, so the resumed table is the one an uninterrupted run writes (the ``seconds`` column aside).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from bbzo.errors import ConfigError

__all__ = ["COLUMNS", "RowLog", "format_row"]

#: the columns of each table, in order, and how each value is written
COLUMNS = {
    "certify": (("idx", "d"), ("label", "d"), ("predict", "d"), ("radius", ".6f"), ("correct", "d"), ("nA", "d"),
                ("pA_lower", ".8f"), ("seconds", ".3f")),
    "predict": (("idx", "d"), ("label", "d"), ("predict", "d"), ("correct", "d"), ("nA", "d"), ("nB", "d"),
                ("p_value", ".6g"), ("seconds", ".3f")),
}


def format_row(mode: str, row: dict[str, Any]) -> str:
    return "\t".join(format(row[name], fmt) for name, fmt in COLUMNS[mode]) + "\n"


def _parse(mode: str, line: str, where: str) -> dict[str, Any]:
    cols = COLUMNS[mode]
    parts = line.split("\t")
    if len(parts) != len(cols):
        raise ConfigError(f"{where}: {len(parts)} columns, expected {len(cols)}; the file is damaged. Delete the "
                          "line (and those after it) to certify those images again, or use --overwrite.")
    try:
        return {name: (int(v) if fmt == "d" else float(v)) for (name, fmt), v in zip(cols, parts)}
    except ValueError:
        raise ConfigError(f"{where}: {line!r} is not a row of numbers; the file is damaged. Delete the line (and "
                          "those after it) to certify those images again, or use --overwrite.") from None


class RowLog:
    """The table of one pipeline: the rows done so far, and ``append(row)`` for the next one.

    Args:
        path: ``OUT/NAME/certify.tsv`` (or ``predict.tsv``).
        mode: ``"certify"`` or ``"predict"`` (the columns).
        plan: The dataset indices this pipeline certifies, in order.
        resume: Continue the rows already in ``path`` (False: start the file afresh).
    """

    def __init__(self, path: Path, mode: str, plan: Sequence[int], resume: bool) -> None:
        self.path, self.mode, self.plan = Path(path), mode, [int(i) for i in plan]
        self.header = "\t".join(name for name, _ in COLUMNS[mode]) + "\n"
        self.rows: list[dict[str, Any]] = []
        self.resumed = 0
        if resume and self.path.exists():
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as f:
                f.write(self.header)
                f.flush()
                os.fsync(f.fileno())

    def _read(self) -> None:
        data = self.path.read_bytes()
        text = data.decode("utf-8", errors="replace")
        if not text.startswith(self.header):
            raise ConfigError(f"{self.path} does not start with the {self.mode} header ({self.header.strip()!r}); "
                              "it is from another version or mode. Use --overwrite to start over.")
        complete = text[:text.rfind("\n") + 1]
        if len(complete) < len(text):  # a torn last line: the image in flight when the run stopped
            with open(self.path, "r+b") as f:
                f.truncate(len(complete.encode("utf-8")))
                f.flush()
                os.fsync(f.fileno())
        lines = complete[len(self.header):].splitlines()
        for k, line in enumerate(lines):
            where = f"{self.path} line {k + 2}"
            row = _parse(self.mode, line, where)
            if k >= len(self.plan) or row["idx"] != self.plan[k]:
                expect = self.plan[k] if k < len(self.plan) else "nothing (the plan has ended)"
                raise ConfigError(f"{where}: image {row['idx']}, but this run's image {k + 1} is {expect}; the file is "
                                  "from other settings. Use --overwrite to start over, or another --out.")
            self.rows.append(row)
        self.resumed = len(self.rows)

    @property
    def done(self) -> int:
        return len(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        """Write one row durably (flush + fsync) before the next image starts."""
        k = len(self.rows)
        if k >= len(self.plan) or int(row["idx"]) != self.plan[k]:
            raise RuntimeError(f"row for image {row['idx']} is out of the plan's order at position {k}")
        line = format_row(self.mode, row)
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(_parse(self.mode, line.rstrip("\n"), str(self.path)))  # as a resumed run reads it back
