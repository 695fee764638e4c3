"""ProcessOracle: the bbzo oracle protocol against a well-behaved program, a misbehaving one, and heater.awk."""

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bbzo.errors import BudgetExceeded, ConfigError, OracleError
from bbzo.oracles.process import ProcessOracle

FAKE = str(Path(__file__).with_name("fake_program.py"))
ROOT = Path(__file__).resolve().parents[2]
HEATER = ROOT / "examples" / "custom_simulator" / "heater.sh"


def fake(*args: str, **kw) -> ProcessOracle:
    kw.setdefault("timeout", 20.0)  # generous: only the tests of waiting faults wait
    kw.setdefault("startup_timeout", 20.0)
    return ProcessOracle([sys.executable, FAKE, *args], **kw)


@pytest.mark.parametrize("fmt", ["text", "f32le", "f64le"])
def test_formats_answer_every_row_and_the_program_stays_up(fmt):
    x = torch.randn(7, 3, dtype=torch.float64)
    with fake("--format", fmt, "--d-in", "3", "--d-out", "2") as o:
        assert (o.d_in, o.d_out, o.format) == (3, 2, fmt)
        pid = o.pid
        y1 = o.query(x)
        y2 = o.query(x[:2].float())
        assert o.pid == pid and o.alive  # one process for all queries
        proc = o._proc
    tol = 1e-6 if fmt == "f32le" else 0.0
    assert y1.shape == (7, 2) and y1.dtype == torch.float64
    assert torch.allclose(y1[:, 0], x.sum(1), rtol=tol, atol=tol) and torch.allclose(y1[:, 1], 2 * x.sum(1), rtol=tol, atol=tol)
    assert y2.dtype == torch.float32 and torch.allclose(y2, y1[:2].float(), rtol=1e-6)
    assert (o.rows_used, o.calls_used) == (9, 2)
    assert proc.poll() == 0  # close() asked it to quit and it exited cleanly


def test_large_queries_stream_both_ways_without_deadlock():
    x = torch.rand(30_000, 2, dtype=torch.float64)  # ~1 MB each way: far beyond a pipe buffer
    with fake() as o:
        y = o.query(x)
    assert torch.equal(y[:, 0], x[:, 0] + x[:, 1])


def test_argv_must_be_a_list_and_the_program_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="argument list, not a string"):
        ProcessOracle(f"{sys.executable} {FAKE}")
    with pytest.raises(OracleError, match="not found"):
        ProcessOracle([str(tmp_path / "no-such-simulator")])
    script = tmp_path / "sim.sh"
    script.write_text("echo hi\n")  # not executable
    with pytest.raises(OracleError, match="not executable"):
        ProcessOracle([str(script)])


@pytest.mark.parametrize("mode, message", [
    ("no_handshake", "is not a bbzo oracle: its first line was 'Welcome to SimCorp"),
    ("bad_version", "protocol version '9'"),
    ("silent", "printed no handshake within 0.5 s"),
    ("die_at_start", "exited with code 7 before the handshake.*license server unreachable"),
])
def test_a_wrong_program_fails_fast_at_start(mode, message):
    with pytest.raises(OracleError, match=message) as e:  # a short wait only where waiting is the fault
        fake("--mode", mode, startup_timeout=0.5 if mode == "silent" else 20)
    assert "fake_program.py" in str(e.value)


FAULTS = [
    ("crash", "exited with code 3.*Segmentation fault \\(pretend\\)"),
    ("hang", "no complete answer within the timeout of 0.3 s \\(--oracle-timeout; nothing received\\)"),
    ("garbage", "malformed reply header 'Traceback"),
    ("wrong_rows", "wrong number of rows: the reply header says 2 rows for a query of 3 rows"),
    ("short", "received the header 'ok 3 1' and 2 of 3 rows"),
    ("wide", "wrong (row|reply) size"),  # text: a row with 2 values; binary: 4 bytes too many
    ("junk_after", "unexpected bytes after the 3 rows"),
    ("nan", "returned NaN/inf in 1 of 3 rows \\(first bad row 2"),
    ("error", "answered with an error: solver did not converge"),
]


@pytest.mark.parametrize("fmt", ["text", "f32le"])
@pytest.mark.parametrize("mode, message", FAULTS)
def test_each_fault_names_the_program_the_query_and_the_rows(mode, message, fmt):
    x = torch.rand(3, 2)
    with fake("--mode", mode, "--at", "2", "--format", fmt, timeout=0.3 if mode in ("hang", "short") else 20) as o:
        o.query(x)  # query 1 is fine
        with pytest.raises(OracleError, match=message) as e:
            o.query(x)
    text = str(e.value)
    assert "fake_program.py" in text and "call #2 (3 rows; request 2 to this process)" in text and "\n" not in text
    assert o.rows_used == 3 and o.calls_used == 1  # a failed query is not counted


def test_bytes_after_an_answer_are_caught_before_the_next_query():
    with fake("--mode", "junk_later", "--at", "2") as o:
        o.query(torch.rand(3, 2))
        o.query(torch.rand(3, 2))  # complete and correct; a log line follows 50 ms later
        time.sleep(0.3)
        with pytest.raises(OracleError, match="call #3 .*unexpected bytes after the answer to request 2, before this "
                                              "request was sent .*late log line"):
            o.query(torch.rand(3, 2))


def test_restart_and_retry_recovers_from_a_transient_crash_and_says_so(tmp_path, capsys):
    marker = tmp_path / "crashed-once"
    log = tmp_path / "stderr.log"
    x = torch.rand(4, 2, dtype=torch.float64)
    with fake("--mode", "crash", "--at", "2", "--marker", str(marker), restarts=1, stderr_log=log) as o:
        o.query(x)
        pid = o.pid
        y = o.query(x)  # crashes, is restarted, the same query is re-sent
        assert marker.exists() and o.restarts_used == 1 and o.pid != pid
    assert torch.equal(y[:, 0], x.sum(1)) and o.calls_used == 2
    said = capsys.readouterr().err
    assert "restarting the program (restart 1 of 1)" in said and "exited with code 3" in said
    assert "restarting the program (restart 1 of 1)" in log.read_text() and len(o.restart_log) == 1


def test_restarts_give_up_and_say_so():
    with fake("--mode", "hang", restarts=1, timeout=0.3) as o:
        with pytest.raises(OracleError, match="timeout .*gave up after 1 restart\\)"):
            o.query(torch.rand(2, 2))
        assert o.restarts_used == 1 and not o.alive


def test_without_restarts_the_next_query_starts_a_fresh_program_and_hints_fit_the_failure(tmp_path):
    marker = tmp_path / "m"
    with fake("--mode", "garbage", "--marker", str(marker)) as o:
        with pytest.raises(OracleError, match="failed on its first call.*restarting would not help"):
            o.query(torch.rand(2, 2))
        assert not o.alive
        assert o.query(torch.ones(2, 2))[:, 0].tolist() == [2.0, 2.0]
    with fake("--mode", "garbage", "--at", "2", "--marker", str(tmp_path / "m2")) as o:
        o.query(torch.rand(2, 2))
        with pytest.raises(OracleError, match="transient, --oracle-restarts N restarts the program"):
            o.query(torch.rand(2, 2))
    with fake("--mode", "hang", "--at", "2", timeout=0.3) as o:
        o.query(torch.rand(2, 2))
        with pytest.raises(OracleError, match=r"timeout of 0.3 s \(--oracle-timeout"):
            o.query(torch.rand(2, 2))


def test_nan_and_error_replies_are_answers_not_retried(tmp_path):
    for mode in ("nan", "error"):
        marker = tmp_path / mode
        with fake("--mode", mode, "--marker", str(marker), restarts=3) as o:
            pid = o.pid
            with pytest.raises(OracleError):
                o.query(torch.rand(3, 2))
            assert o.restarts_used == 0 and o.pid == pid  # the stream is intact: same program
            assert o.query(torch.ones(1, 2)).item() == 2.0


def test_inputs_are_checked_before_sending():
    with fake() as o:
        with pytest.raises(OracleError, match="input rows hold NaN/inf; not sent"):
            o.query(torch.tensor([[0.0, float("nan")]]))
        with pytest.raises(OracleError, match="shape \\(2,\\)"):
            o.query(torch.zeros(2, 3))
        o.max_rows = 5
        o.query(torch.zeros(4, 2))
        with pytest.raises(BudgetExceeded):
            o.query(torch.zeros(2, 2))


def test_stderr_is_drained_and_logged(tmp_path):
    log = tmp_path / "stderr.log"
    with fake("--mode", "chatty", stderr_log=log) as o:
        for _ in range(3):  # 3 x 360 KB of stderr: a program blocked on a full stderr pipe would hang here
            o.query(torch.rand(2, 2))
    text = log.read_text()
    assert text.count("residual small enough") == 3 * 4096 and "fake oracle starting" in text


def test_close_kills_a_program_that_ignores_quit():
    o = fake("--mode", "ignore_quit")
    proc = o._proc
    o.close(grace=0.2)
    assert proc.poll() is not None and o._proc is None
    o.close()  # idempotent


@pytest.mark.skipif(shutil.which("awk") is None, reason="needs awk")
def test_the_shipped_awk_simulator_matches_its_numpy_twin():
    sys.path.insert(0, str(HEATER.parent))
    try:
        import heater
    finally:
        sys.path.remove(str(HEATER.parent))
    u = np.random.default_rng(0).uniform(-0.2, 1.2, size=(500, 2))
    with ProcessOracle([str(HEATER)], timeout=10) as o:
        assert (o.d_in, o.d_out, o.format) == (2, 2, "text")
        y = o.query(torch.from_numpy(u)).numpy()
        y2 = o.query(torch.from_numpy(u[:3])).numpy()
    np.testing.assert_allclose(y, heater.simulate(u), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(y2, y[:3])
    assert y[:, 1].max() < heater.T_MAX + 0.5  # the thermostat cuts the heater


def test_a_pool_splits_rows_across_copies_in_order_and_faults_stay_per_copy(tmp_path):
    from bbzo.oracles.process import ProcessPool

    x = torch.rand(101, 2, dtype=torch.float64)
    with ProcessPool([sys.executable, FAKE], workers=3, timeout=20, startup_timeout=20, min_rows=8) as pool:
        y = pool.query(x)
        pids = [c.pid for c in pool.copies]
        assert len(set(pids)) == 3 and all(c.calls_used == 1 for c in pool.copies)
        assert [c.rows_used for c in pool.copies] == [33, 34, 34] and pool.rows_used == 101 and pool.calls_used == 1
        assert torch.equal(pool.query(x[:5]), y[:5])  # a small call goes to one copy
        assert pool.copies[0].calls_used == 2 and pool.copies[1].calls_used == 1
    assert torch.equal(y[:, 0], x[:, 0] + x[:, 1])
    marker = tmp_path / "once"
    with ProcessPool([sys.executable, FAKE, "--mode", "crash", "--at", "1", "--marker", str(marker)], workers=2,
                     timeout=20, startup_timeout=20, restarts=1, min_rows=1) as pool:
        y = pool.query(x[:10])  # each copy crashes on its first call once; each restarts on its own
        assert torch.equal(y[:, 0], x[:10, 0] + x[:10, 1]) and pool.restarts_used >= 1
    with ProcessPool([sys.executable, FAKE, "--mode", "error", "--at", "1"], workers=2, timeout=20,
                     startup_timeout=20, min_rows=1) as pool:
        with pytest.raises(OracleError, match=r"x2, rows 0\.\.4 of 10: .*solver did not converge"):
            pool.query(x[:10])


# ---------------------------------------------------------------------------- protocol 1.2: the seed capability
HEATER_MC = ROOT / "examples" / "stochastic_simulator" / "heater_mc.py"


def test_handshake_capabilities_and_the_seed_field_of_a_query():
    from bbzo.oracles.process.protocol import Transport, encode_query, handshake_capabilities, parse_handshake

    assert parse_handshake("bbzo-oracle 1 2 3 text seed", prefix="p") == (2, 3, "text")
    assert handshake_capabilities("bbzo-oracle 1 2 3 text seed") == {"seed"}
    assert handshake_capabilities("bbzo-oracle 1 2 3 text") == frozenset()
    with pytest.raises(Transport, match="unknown capability 'fast'.*knows seed"):
        parse_handshake("bbzo-oracle 1 2 3 text fast", prefix="p")
    arr = np.array([[1.0, 2.0]])
    assert encode_query(arr, "text") == b"query 1 2\n1.0 2.0\n"  # revision 1.0 requests are unchanged
    assert encode_query(arr, "text", seed=17) == b"query 1 2 seed=17\n1.0 2.0\n"
    assert encode_query(arr, "f64le", seed=0).startswith(b"query 1 2 seed=0\n")


def test_a_seeded_program_gets_the_seed_and_an_old_program_never_sees_the_field():
    from bbzo.oracle import common_random_numbers
    from bbzo.oracles.process import ProcessPool

    x = torch.rand(40, 2, dtype=torch.float64)
    with ProcessOracle([sys.executable, str(HEATER_MC), "0"], timeout=20, startup_timeout=20) as o:
        assert o.capabilities == {"seed"} and o.accepts_seed
        with common_random_numbers(5):
            a, b = o.query(x), o.query(x[7:12])  # the same seed: every row the same answer, whatever the call
            c = o.query(x.flip(0)).flip(0)
        with common_random_numbers(6):
            d = o.query(x)
        e, f = o.query(x), o.query(x)  # no seed: every row draws its own weather
    assert torch.equal(a[7:12], b) and torch.equal(a, c)
    assert (a - d).abs().max() > 0.05 and (e - f).abs().max() > 0.05
    with ProcessPool([sys.executable, str(HEATER_MC), "0"], workers=2, min_rows=4, timeout=20, startup_timeout=20) as pool:
        assert pool.accepts_seed
        with common_random_numbers(5):  # both copies get the seed (their threads run in copies of this context)
            assert torch.equal(pool.query(x), a) and all(cp.calls_used == 1 for cp in pool.copies)
    with fake() as old:  # a revision-1.0 program (its handshake has no capabilities) answers under CRN as before
        assert not old.accepts_seed
        with common_random_numbers(5):
            y = old.query(x)
    assert torch.equal(y[:, 0], x[:, 0] + x[:, 1])
