"""Where a number comes from: the git commit (and whether the tree was dirty), versions, threads, machine.

Every run folder (``run.json``) and every committed benchmark JSON records this, so a result can be
traced to the code and environment that produced it and rerun from a clean checkout.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["provenance"]


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """Where a result comes from: git commit (and whether the tree was dirty), versions, threads, machine."""
    import bbzo

    status = _git("diff", "--name-only", "HEAD")  # tracked files that differ from the commit
    # results a benchmark writes are outputs, not code: a rewritten benchmarks/results/*.json is not dirt
    changed = None if status is None else [f for f in status.splitlines()
                                           if f and not f.startswith("benchmarks/results/")]
    versions = {"bbzo": bbzo.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("phi", "numpy"):
        try:
            versions[mod if mod != "phi" else "phiflow"] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 -- an optional package that is missing or broken
            pass
    return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(changed) if changed is not None else None,
            "changed": changed[:20] if changed else [],
            "versions": versions, "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {platform.system()}",
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
