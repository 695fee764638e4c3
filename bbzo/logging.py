"""Listeners for the trainer's hooks: JSONL metrics and a tqdm progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["JSONLLogger", "ProgressBar", "read_jsonl"]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class JSONLLogger:
    """Append one JSON object per logged step to ``path``.

    On resume, lines of steps after the checkpoint are dropped, so the file matches the run exactly.
    """

    def __init__(self, path: Union[str, Path], extra: Optional[dict[str, Any]] = None) -> None:
        self.path = Path(path)
        self.extra = extra or {}
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def attach(self, trainer: Any) -> "JSONLLogger":
        trainer.on_log.append(self)
        trainer.on_resume.append(self.truncate_after)
        return self

    def __call__(self, trainer: Any, status: dict[str, Any]) -> None:
        row = {**self.extra, **{k: _clean(v) for k, v in status.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, trainer: Any) -> None:
        self.truncate(trainer.step_count)

    def truncate(self, step: int) -> None:
        """Drop the rows of steps after ``step`` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def save_figure(fig: Any, path: Union[str, Path], dpi: int = 120, tight: bool = True) -> Path:
    """Save a matplotlib figure as PNG (after ``tight_layout`` if ``tight``) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def read_jsonl(path: Union[str, Path]) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return rows


class ProgressBar:
    """tqdm bar showing loss, queries/s and total queries."""

    def __init__(self, desc: str = "zo", disable: bool = False) -> None:
        self.desc, self.disable = desc, disable
        self.bar: Any = None

    def attach(self, trainer: Any) -> "ProgressBar":
        trainer.after_step.append(self)
        return self

    def __call__(self, trainer: Any, status: dict[str, Any]) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.step_count - 1, desc=self.desc,
                            disable=self.disable, dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{status['loss']:.4g}", q_per_s=f"{status['queries_per_s']:.0f}",
                             queries=status["queries_used"], refresh=False)
        if trainer.done:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
