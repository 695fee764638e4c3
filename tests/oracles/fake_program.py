"""A bbzo-protocol oracle program that misbehaves on request (run with sys.executable; stdlib only).

    fake_program.py [--format text|f32le|f64le] [--d-in 2] [--d-out 1] [--mode MODE] [--at K] [--marker FILE]

Answers ``y_j = (j + 1) * sum(x)`` for each output ``j``. From query ``K`` (1-based, default 1) on it
misbehaves as MODE says: ``ok`` (never), ``crash`` (exit 3), ``hang`` (sleep), ``garbage`` (a junk
header), ``wrong_rows`` (one row too few), ``short`` (header promises n rows, sends n-1, then waits),
``wide`` (a row with an extra value), ``nan``, ``error`` (an ``error`` reply), ``junk_after`` (bytes
after the reply, in the same write), ``junk_later`` (bytes after the reply, 50 ms later), ``chatty`` (256 KiB on stderr before answering), ``ignore_quit`` (never exits). Start-up modes: ``no_handshake`` (prints a banner), ``bad_version``, ``silent``,
``die_at_start``. Row modes (every query, whatever ``--at``): ``fail_rows`` reports the rows whose inputs
sum to more than ``--threshold`` as failed (``ok n d failed=i,j``), ``nan_rows`` answers them with NaN.
With ``--marker FILE`` the misbehaviour happens only while FILE does not exist, and
creates it (a transient fault: a restarted program behaves).
"""

import argparse
import os
import struct
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--format", default="text")
p.add_argument("--d-in", type=int, default=2)
p.add_argument("--d-out", type=int, default=1)
p.add_argument("--mode", default="ok")
p.add_argument("--at", type=int, default=1)
p.add_argument("--marker", default=None)
p.add_argument("--threshold", type=float, default=1.0)
a = p.parse_args()

out, inp = sys.stdout.buffer, sys.stdin.buffer
print(f"fake oracle starting, mode={a.mode}", file=sys.stderr, flush=True)
if a.mode == "no_handshake":
    out.write(b"Welcome to SimCorp simulator 3.1\n")
    out.flush()
    time.sleep(30)
if a.mode == "bad_version":
    out.write(f"bbzo-oracle 9 {a.d_in} {a.d_out} {a.format}\n".encode())
    out.flush()
    time.sleep(30)
if a.mode == "silent":
    time.sleep(30)
if a.mode == "die_at_start":
    print("fatal: license server unreachable", file=sys.stderr, flush=True)
    sys.exit(7)
out.write(f"bbzo-oracle 1 {a.d_in} {a.d_out} {a.format}\n".encode())
out.flush()

fmt = {"f32le": "f", "f64le": "d"}.get(a.format)
size = {"f": 4, "d": 8}.get(fmt, 0)


def read_rows(n, d):
    if fmt is None:
        return [[float(t) for t in inp.readline().split()] for _ in range(n)]
    raw = inp.read(n * d * size)
    vals = struct.unpack(f"<{n * d}{fmt}", raw)
    return [list(vals[i * d:(i + 1) * d]) for i in range(n)]


def encode_rows(rows):
    if fmt is None:
        return "".join(" ".join(repr(v) for v in r) + "\n" for r in rows).encode()
    flat = [v for r in rows for v in r]
    return struct.pack(f"<{len(flat)}{fmt}", *flat)


def send(data):
    """One write(2) per answer: the reader sees it whole, so faults are found at the query that made them."""
    out.flush()
    os.write(out.fileno(), data)


k = 0
while True:
    line = inp.readline()
    if not line or line.strip() == b"quit":
        if a.mode == "ignore_quit":
            time.sleep(60)
        break
    _, n, d = line.split()
    n, d = int(n), int(d)
    rows = read_rows(n, d)
    k += 1
    ys = [[(j + 1) * sum(r) for j in range(a.d_out)] for r in rows]
    bad = a.mode != "ok" and k >= a.at and not (a.marker and os.path.exists(a.marker))
    if bad and a.marker:
        open(a.marker, "w").close()
    mode = a.mode if bad else "ok"
    print(f"query {k}: {n} rows, mode {mode}", file=sys.stderr, flush=True)
    if mode == "crash":
        print("Segmentation fault (pretend)", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "hang":
        time.sleep(60)
    if mode == "garbage":
        send(b"Traceback (most recent call last): oops\n")
        continue
    if mode == "error":
        send(b"error solver did not converge\n")
        continue
    if mode == "chatty":
        for i in range(4096):
            sys.stderr.write(f"iteration {i}: residual small enough, continuing with the next block of cells\n")
        sys.stderr.flush()
    if mode == "nan":
        ys[-1][0] = float("nan")
    if mode == "wrong_rows":
        ys = ys[:-1]
    if mode == "wide":
        ys[0] = ys[0] + [1.0]
    if mode == "short":
        send(f"ok {n} {a.d_out}\n".encode() + encode_rows(ys[:-1]))
        time.sleep(60)
    failed = ""
    if a.mode in ("fail_rows", "nan_rows"):
        over = [i for i, r in enumerate(rows) if sum(r) > a.threshold]
        for i in over:
            ys[i] = [float("nan")] * a.d_out if a.mode == "nan_rows" else [0.0] * a.d_out
        if a.mode == "fail_rows" and over:
            failed = " failed=" + ",".join(map(str, over))
    reply = f"ok {len(ys)} {a.d_out}{failed}\n".encode() + encode_rows(ys)
    send(reply + (b"DEBUG: done\n" if mode == "junk_after" else b""))
    if mode == "junk_later":
        time.sleep(0.05)
        send(b"DEBUG: late log line\n")
