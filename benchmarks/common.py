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
