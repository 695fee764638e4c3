"""The heater simulator, with a fault injected on one rank (for the distributed fault tests).

``BBZO_TEST_FAULT=RANK:CALL:KIND``: on rank RANK, the CALL-th call (1-based) raises (``raise``), kills the
process (``die``) or hangs (``hang``). ``BBZO_TEST_FRAGILE=U``: rows whose first heater setting is above ``U``
cannot be answered (NaN), on every rank.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples" / "custom_simulator"))
from heater import simulate as _simulate  # noqa: E402

_CALLS = [0]


def simulate(u):
    fault = os.environ.get("BBZO_TEST_FAULT")
    if fault:
        rank, call, kind = fault.split(":")
        if os.environ.get("RANK") == rank:
            _CALLS[0] += 1
            if _CALLS[0] == int(call):
                if kind == "raise":
                    raise RuntimeError("the heater model blew a fuse")
                if kind == "die":
                    os._exit(7)
                time.sleep(600)
    out = _simulate(u)
    fragile = os.environ.get("BBZO_TEST_FRAGILE")
    if fragile:
        out[u[:, 0] > float(fragile)] = float("nan")
    return out
