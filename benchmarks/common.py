"""What every benchmark script shares: printing its JSON result and writing it to ``--out``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union


def emit(result: dict[str, Any], path: Optional[Union[str, Path]]) -> None:
    """Print ``result`` as JSON and, if ``path`` is given, write it there too (creating its folder)."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def coords_from_flat(params: dict, flat: Any) -> dict:
    """Sorted flat indices over all parameters (in order) -> ``{name: indices inside that tensor}`` (non-empty only)."""
    coords, start = {}, 0
    for n, p in params.items():
        sel = flat[(flat >= start) & (flat < start + p.numel())] - start
        if sel.numel():
            coords[n] = sel
        start += p.numel()
    return coords
