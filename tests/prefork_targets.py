"""Programs for tests/test_prefork.py to fork from the warm launcher: each is a `main(argv)` as a module's
would be, doing one thing a worker may do on its way out."""

from __future__ import annotations

import atexit
import sys
import threading
import time


def exit_with(argv: list[str]) -> int:
    return int(argv[0])


def raise_error(argv: list[str]) -> int:
    raise RuntimeError(argv[0])


def interrupted(argv: list[str]) -> int:
    raise KeyboardInterrupt


def exit_with_message(argv: list[str]) -> int:
    sys.exit(argv[0])


def late_thread_and_atexit(argv: list[str]) -> int:
    """Returns at once; a non-daemon thread writes argv[0] 0.3 s later, an atexit handler says goodbye."""
    def write() -> None:
        time.sleep(0.3)
        with open(argv[0], "w", encoding="utf-8") as fh:
            fh.write("written")

    threading.Thread(target=write).start()
    atexit.register(lambda: print("goodbye from atexit", file=sys.stderr))
    return 0


def sleep_until_signalled(argv: list[str]) -> int:
    print("sleeping", file=sys.stderr, flush=True)
    time.sleep(600)
    return 0
