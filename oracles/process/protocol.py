"""The bbzo oracle protocol, version 1: a pure codec (no processes), spelled out in ``docs/custom_simulators.md``::

    program -> bbzo   bbzo-oracle 1 <d_in> <d_out> <format> [seed]\\n   handshake, once, at start
    bbzo -> program   query <n> <d_in> [seed=<s>]\\n + n x d_in values   one request per call
    program -> bbzo   ok <n> <d_out> [failed=<i>,<j>]\\n + n x d_out     its answer
                      error <message>\\n                                  or: this call failed
    bbzo -> program   quit\\n  (then stdin is closed)                     on close

``<format>`` is ``text`` (one row per line, values separated by spaces; easy in awk or a shell),
``f32le`` or ``f64le`` (raw little-endian float32 / float64, row-major, no separators).

Revisions of version 1 (each optional, so a program written for an earlier one works unchanged):

* 1.0 -- the handshake, ``query``, ``ok``, ``error``, ``quit``;
* 1.1 -- ``failed=<rows>`` in a reply header: rows the program could not answer;
* 1.2 -- the ``seed`` capability: a program that ends its handshake with the word ``seed`` receives
  ``seed=<s>`` (a decimal integer in ``[0, 2**31)``) in the header of every query made with common random
  numbers, and must then answer each row from that seed alone (the same answer for the same row and seed,
  whatever the other rows of the call). Programs that do not declare it never see the field.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["PROTOCOL_VERSION", "PROTOCOL_REVISION", "CAPABILITIES", "FORMATS", "MAX_LINE", "Transport", "Reported",
           "parse_handshake", "handshake_capabilities", "encode_query", "parse_reply", "parse_text_rows", "progress_text",
           "first_bytes"]

PROTOCOL_VERSION = 1
#: The newest revision of version 1 this bbzo speaks (the module docstring lists them): "1.2".
PROTOCOL_REVISION = 2
#: Words a program may append to its handshake to opt in to an optional feature.
CAPABILITIES = {"seed": "1.2: takes a common-random-numbers seed per query ('query <n> <d_in> seed=<s>')"}
FORMATS: dict[str, Optional[np.dtype]] = {"text": None, "f32le": np.dtype("<f4"), "f64le": np.dtype("<f8")}
MAX_LINE = 4096  # a header longer than this is garbage


class Transport(Exception):
    """The exchange broke (exit, timeout, garbage): kill the program, maybe restart and retry."""


class Reported(Exception):
    """The program answered ``error <message>``: the stream is intact, the call failed."""


def first_bytes(buf: bytes, n: int = 40) -> str:
    """The first non-blank bytes of ``buf``, quoted (stray output often starts with an empty line)."""
    data = bytes(buf)
    stripped = data.lstrip(b" \t\r\n")
    skipped = len(data) - len(stripped)
    shown = repr(stripped[:n]) + ("..." if len(stripped) > n else "")
    return f"{shown}, after {skipped} blank bytes" if skipped else shown


def parse_handshake(line: str, *, prefix: str, tail: str = "",
                    previous: Optional[tuple[int, int, str]] = None) -> tuple[int, int, str]:
    """``(d_in, d_out, format)`` from a handshake line; :class:`Transport` naming what is wrong otherwise.

    ``prefix`` names the program in messages, ``tail`` quotes its last stderr lines; ``previous`` is the
    handshake of the run so far (a restarted program must declare the same).
    """
    expected = (f"'bbzo-oracle {PROTOCOL_VERSION} <d_in> <d_out> <format> [capability ...]' with format one of "
                f"{', '.join(FORMATS)} and capabilities from {', '.join(CAPABILITIES)}")
    parts = line.split()
    if not parts or parts[0] != "bbzo-oracle":
        raise Transport(f"{prefix} is not a bbzo oracle: its first line was {line[:120]!r}, expected {expected}.{tail}")
    if len(parts) >= 2 and parts[1] != str(PROTOCOL_VERSION):
        raise Transport(f"{prefix} speaks bbzo oracle protocol version {parts[1]!r}; this bbzo speaks "
                        f"version {PROTOCOL_VERSION}.")
    if len(parts) < 5:
        raise Transport(f"{prefix}: malformed handshake {line[:120]!r}, expected {expected}.")
    unknown = [w for w in parts[5:] if w not in CAPABILITIES]
    if unknown:
        raise Transport(f"{prefix}: handshake {line[:120]!r} declares the unknown capability {unknown[0]!r}; this bbzo "
                        f"(protocol 1.{PROTOCOL_REVISION}) knows {', '.join(CAPABILITIES)}. Drop the word, or update bbzo.")
    try:
        d_in, d_out = int(parts[2]), int(parts[3])
    except ValueError:
        d_in = d_out = 0
    if d_in < 1 or d_out < 1:
        raise Transport(f"{prefix}: handshake {line[:120]!r} must declare d_in and d_out as positive integers.")
    if parts[4] not in FORMATS:
        raise Transport(f"{prefix}: handshake declares unknown format {parts[4]!r}; use one of {', '.join(FORMATS)}.")
    if previous is not None and (d_in, d_out, parts[4]) != previous:
        raise Transport(f"{prefix} restarted with a different handshake {line!r} (was d_in={previous[0]}, "
                        f"d_out={previous[1]}, format={previous[2]}).")
    return d_in, d_out, parts[4]


def handshake_capabilities(line: str) -> frozenset[str]:
    """The optional capabilities a (valid, see :func:`parse_handshake`) handshake line declares, e.g. ``{'seed'}``."""
    return frozenset(line.split()[5:])


def encode_query(arr: np.ndarray, fmt: str, seed: Optional[int] = None) -> bytes:
    """One request: ``query <n> <d>\\n`` (``query <n> <d> seed=<s>\\n`` with a seed) and ``arr`` ``(n, d)`` in the
    program's format. Send a seed only to a program that declared the ``seed`` capability."""
    n, d = arr.shape
    header = (f"query {n} {d}\n" if seed is None else f"query {n} {d} seed={int(seed)}\n").encode()
    dtype = FORMATS[fmt]
    if dtype is None:
        # repr: the shortest text that reads back as the same float64; one format string for all rows
        body = ((" ".join(["%r"] * d) + "\n") * n) % tuple(np.asarray(arr, dtype=np.float64).ravel().tolist())
        return header + body.encode()
    return header + np.ascontiguousarray(arr, dtype=dtype).tobytes()


def parse_text_rows(lines: list[str], d: int) -> np.ndarray:
    rows = [line.split() for line in lines]
    for i, toks in enumerate(rows):
        if len(toks) != d:
            raise Transport(f"wrong row size: reply row {i} has {len(toks)} values, expected {d}: {lines[i][:80]!r}")
    try:
        return np.array(rows, dtype=np.float64).reshape(len(rows), d)
    except ValueError:
        for i, toks in enumerate(rows):
            for t in toks:
                try:
                    float(t)
                except ValueError:
                    raise Transport(f"malformed reply: row {i} holds {t[:40]!r}, which is not a number") from None
        raise


def parse_reply(buf: bytearray, n: int, d_out: int, fmt: str) -> Optional[np.ndarray]:
    """The complete reply to an ``n``-row request at the start of ``buf`` (consumed), or None if more bytes
    are needed. Rows the program declared ``failed=`` come back as NaN. Raises :class:`Reported` for an
    ``error`` answer and :class:`Transport` for garbage."""
    nl = buf.find(b"\n")
    if nl < 0:
        if len(buf) > MAX_LINE:
            raise Transport(f"malformed reply: no header line in the first {MAX_LINE} bytes ({bytes(buf[:60])!r}...)")
        return None
    line = bytes(buf[:nl]).decode("ascii", errors="replace").strip()
    parts = line.split()
    if not parts:  # a blank line where the header belongs: quote what follows it
        raise Transport(f"malformed reply: a blank line where the header 'ok {n} {d_out}' belongs ({first_bytes(buf)})")
    if parts[:1] == ["error"]:
        del buf[:nl + 1]
        raise Reported(line[len("error"):].strip() or "(no message)")
    failed: list[int] = []
    try:
        if len(parts) not in (3, 4) or parts[0] != "ok":
            raise ValueError
        rn, rd = int(parts[1]), int(parts[2])
        if len(parts) == 4:
            if not parts[3].startswith("failed="):
                raise ValueError
            failed = [int(i) for i in parts[3][len("failed="):].split(",") if i]
    except ValueError:
        raise Transport(f"malformed reply header {line[:120]!r}; expected 'ok {n} {d_out}' (optionally with "
                        "' failed=<row>,<row>,...'), or 'error <message>'") from None
    if any(not 0 <= i < n for i in failed):
        raise Transport(f"the reply header {line[:120]!r} names rows outside 0..{n - 1}")
    if rn != n:
        raise Transport(f"wrong number of rows: the reply header says {rn} rows for a query of {n} rows")
    if rd != d_out:
        raise Transport(f"wrong row size: the reply header says {rd} values per row, the handshake declared d_out={d_out}")
    start = nl + 1
    dtype = FORMATS[fmt]
    if dtype is not None:
        need = n * rd * dtype.itemsize
        if len(buf) - start < need:
            return None
        out = np.frombuffer(bytes(buf[start:start + need]), dtype=dtype).astype(np.float64).reshape(n, rd)
        end = start + need
    else:
        if buf.count(b"\n", start) < n:  # called on every chunk that arrives: a C-speed check, not a Python loop
            return None
        end = start
        for _ in range(n):
            j = buf.find(b"\n", end)
            if j < 0:
                return None
            end = j + 1
        lines = bytes(buf[start:end]).decode("ascii", errors="replace").splitlines()
        for i in failed:  # a failed row may hold anything of the right width (e.g. 'nan nan' or 'fail fail')
            lines[i] = " ".join(["nan"] * rd)
        out = parse_text_rows(lines, rd)
    if len(buf) > end:
        raise Transport(f"wrong reply size: {len(buf) - end} unexpected bytes after the {n} rows of the reply "
                        f"({bytes(buf[end:end + 40])!r})")
    del buf[:]
    if failed:
        out = out.copy()
        out[failed] = np.nan
    return out


def progress_text(buf: bytearray, n: int, d_out: int, fmt: str) -> str:
    """How much of an ``n``-row reply has arrived (for a timeout message)."""
    if not buf:
        return "nothing received"
    nl = buf.find(b"\n")
    if nl < 0:
        return f"received {len(buf)} bytes of the header"
    head = bytes(buf[:nl]).decode("ascii", errors="replace").strip()[:60]
    body = len(buf) - nl - 1
    dtype = FORMATS[fmt]
    rows = body // (dtype.itemsize * d_out) if dtype is not None else buf.count(b"\n", nl + 1)
    return f"received the header {head!r} and {rows} of {n} rows"
