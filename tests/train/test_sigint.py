"""Ctrl-C during training (docs/training.md): the first SIGINT only sets a flag the loop checks between
steps; a second one stops at once; the previous handler is back afterwards."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from verakit.train.loop import LoopConfig, run_loop
from verakit.train.sigint import SigintFlag

pytestmark = pytest.mark.usefixtures("one_thread")


def test_first_sigint_sets_the_flag_second_interrupts_then_the_handler_is_restored():
    def previous(signum, frame):
        raise AssertionError("the previous handler must not run inside the block")

    old = signal.signal(signal.SIGINT, previous)
    try:
        with pytest.raises(KeyboardInterrupt), SigintFlag() as flag:
            assert not flag.raised
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next bytecode
            assert flag.raised
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("a second SIGINT must interrupt at once")
        assert signal.getsignal(signal.SIGINT) is previous
    finally:
        signal.signal(signal.SIGINT, old)


def test_outside_the_main_thread_it_installs_nothing():
    before, seen = signal.getsignal(signal.SIGINT), []

    def worker():
        with SigintFlag() as flag:
            seen.append((flag.raised, signal.getsignal(signal.SIGINT)))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [(False, before)] and signal.getsignal(signal.SIGINT) is before


def test_second_ctrl_c_in_training_stops_without_a_checkpoint(make_recipe, tmp_path):
    def ctrl_c_twice_at_step_1(info):
        if info.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_loop(make_recipe(), LoopConfig(epochs=1, batch_size=16, quiet=True), run_dir,
                 on_step=ctrl_c_twice_at_step_1)
    assert not (run_dir / "checkpoint" / "state.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_handler_not_installed_from_python_gives_way_to_pythons_default(monkeypatch):
    """signal.signal returns None when the previous SIGINT handler was not set from Python (an embedding
    host): on exit Python's default handler goes back, not ours, which would turn the next Ctrl-C into a flag
    that no loop reads any more."""
    real, old = signal.signal, signal.getsignal(signal.SIGINT)
    calls = []

    def fake(signum, handler):
        calls.append(handler)
        previous = real(signum, handler)
        return None if len(calls) == 1 else previous  # the first install sees a non-Python previous handler

    monkeypatch.setattr(signal, "signal", fake)
    try:
        with SigintFlag() as flag:
            assert signal.getsignal(signal.SIGINT) == flag._handle
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):  # a Ctrl-C after training interrupts as usual
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("SIGINT must raise KeyboardInterrupt at once")
    finally:
        real(signal.SIGINT, old)
