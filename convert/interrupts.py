"""Ctrl-C and SIGTERM: a prompt exit with one line, and never a half-written file left behind.

Two kinds of code run when a signal comes:

* work that writes files (a conversion's temp folder, a download) marks itself with
  ``cleanup_pending()``: the signal unwinds it as a ``KeyboardInterrupt`` so its ``finally``
  blocks remove what it wrote; steps that must not be cut in half (orbax's writer threads
  finishing, a rename pair, removing a temp folder) run under ``signals_deferred()``, which
  delivers the signal when they end.
* everything else (loading, compiling, decoding) can simply stop. Python runs signal handlers
  only between bytecodes, so a main thread inside a long XLA compile would notice Ctrl-C only
  when the compile ends; the CLI therefore installs a watcher thread (``install_cli_handlers``)
  that hears the signal at once through ``signal.set_wakeup_fd`` and ends the process
  (``os._exit``) when no cleanup is pending.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

_LOCK = threading.Lock()  # guards the two fields below; held through os._exit by whoever reports
_pending = 0  # open cleanup_pending() blocks (any thread)
_reported = False  # the one "interrupted" line has been printed


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that cleanup runs the same way."""

    signum = signal.SIGTERM


def signal_number(exc: BaseException) -> int:
    return int(getattr(exc, "signum", signal.SIGINT))


@contextlib.contextmanager
def cleanup_pending():
    """Mark work that must unwind (its ``finally`` blocks remove temp files) rather than stop dead."""
    global _pending
    with _LOCK:
        _pending += 1
    try:
        yield
    finally:
        with _LOCK:
            _pending -= 1


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM until the block ends, then deliver them (main thread only; a no-op elsewhere).

    For steps that a signal must not cut in half: waiting for background writer threads, a pair of
    renames, removing a temp folder. The block also counts as ``cleanup_pending``.
    """
    if threading.current_thread() is not threading.main_thread():
        with cleanup_pending():
            yield
        return
    held: list[int] = []

    def hold(signum, _frame):
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with cleanup_pending():
            yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            _deliver(held[0], previous[held[0]])


def _deliver(signum: int, handler) -> None:
    if callable(handler):
        handler(signum, None)  # e.g. default_int_handler raises KeyboardInterrupt here
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


def _raise_terminated(_signum, _frame):
    raise Terminated()


def report(signum: int, stream=None) -> None:
    """Print the one line for an interrupt (once per process, whichever thread gets here first)."""
    global _reported
    with _LOCK:
        if _reported:
            return
        _reported = True
        _print_line(signum, stream or sys.stderr)


def _print_line(signum: int, stream) -> None:
    what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
    try:
        stream.write(f"{what}; stopped, nothing half-written left behind\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def exit_now(signum: int) -> None:
    """Flush stdout and stderr and end the process with the shell's code for ``signum`` (128 + n)."""
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except (OSError, ValueError):
            pass
    os._exit(128 + int(signum))


def _watch(read_fd: int) -> None:
    global _reported
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        for signum in data:
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            _LOCK.acquire()
            if _pending or _reported:  # the main thread unwinds and reports; let it
                _LOCK.release()
                continue
            _reported = True
            _print_line(signum, sys.stderr)
            exit_now(signum)  # with _LOCK held: no cleanup block can start now


def install_cli_handlers() -> None:
    """SIGTERM behaves like Ctrl-C, and a signal ends the process at once unless cleanup is pending."""
    if threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # nohup and friends: keep ignoring
        signal.signal(signal.SIGTERM, _raise_terminated)
    threading.Thread(target=_watch, args=(read_fd,), name="hetero-jax-signals", daemon=True).start()
