"""agent.recorder.signals in this process: a handler that sets a Flag while the main thread
sleeps in Wakeup ends the sleep at once, and a handler interrupting another (the same
signal again) cannot wedge the main thread."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pytest

from agent.recorder.signals import ASYNC_SIGNALS, Flag, Wakeup, main_thread_only


@pytest.fixture
def usr1_flag() -> Iterator[Flag]:
    flag = Flag()

    def handler(signum: int, frame: FrameType | None) -> None:
        flag.set()

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _send_later(signum: int, delay_s: float) -> threading.Thread:
    sender = threading.Timer(delay_s, os.kill, (os.getpid(), signum))
    sender.start()
    return sender


def test_a_signal_ends_the_wakeup_sleep_at_once(usr1_flag: Flag) -> None:
    wakeup = Wakeup()
    try:
        sender = _send_later(signal.SIGUSR1, 0.2)
        started = time.monotonic()
        wakeup.wait(10.0)
        took = time.monotonic() - started
        sender.join()
        assert usr1_flag.is_set()
        assert took < 5.0, took  # not the 10 s timeout
        usr1_flag.clear()
        started = time.monotonic()
        wakeup.wait(0.3)  # the pipe was drained: nothing wakes it early now
        assert time.monotonic() - started >= 0.25
        assert not usr1_flag.is_set()
    finally:
        wakeup.close()


def test_a_signal_arriving_before_the_wait_is_not_lost(usr1_flag: Flag) -> None:
    wakeup = Wakeup()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        started = time.monotonic()
        wakeup.wait(10.0)
        assert time.monotonic() - started < 5.0
        assert usr1_flag.is_set()
    finally:
        wakeup.close()


def test_threads_started_inside_main_thread_only_block_the_async_signals() -> None:
    seen: list[set[signal.Signals]] = []
    with main_thread_only():
        thread = threading.Thread(target=lambda: seen.append(signal.pthread_sigmask(0, [])))
        thread.start()
        thread.join()
    assert seen[0].issuperset(ASYNC_SIGNALS)
    assert not ASYNC_SIGNALS & signal.pthread_sigmask(0, [])  # this thread's mask is back
