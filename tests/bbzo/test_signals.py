"""bbzo.signals: a signal raises Interrupted, waits inside deferred(), and is only recorded once a run holds."""

import os
import signal

import pytest

from bbzo import signals


@pytest.fixture
def handlers():
    restore = signals.install()
    yield
    restore()


def test_a_signal_raises_interrupted_with_the_shell_exit_code(handlers):
    with pytest.raises(signals.Interrupted) as info:
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.exit_code == 143 and info.value.name == "SIGTERM"


def test_a_signal_inside_deferred_waits_for_the_end_of_the_block(handlers):
    done = []
    with pytest.raises(signals.Interrupted):
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the block finished")
    assert done == ["the block finished"]


def test_a_block_that_fails_keeps_its_own_error(handlers):
    with pytest.raises(RuntimeError, match="peer died"):
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("peer died")


def test_once_held_a_signal_is_recorded_not_raised_until_the_handlers_are_restored():
    restore = signals.install()
    signals.hold()
    os.kill(os.getpid(), signal.SIGTERM)  # a launcher's SIGTERM while the run reports its own error
    restore()
    again = signals.install()  # a new run starts unheld
    try:
        with pytest.raises(signals.Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        again()


def test_a_signal_recorded_while_held_is_not_raised_in_the_next_run():
    restore = signals.install()
    signals.hold()
    os.kill(os.getpid(), signal.SIGTERM)
    restore()
    again = signals.install()
    try:
        with signals.deferred():
            pass  # nothing pending from the previous run
    finally:
        again()
