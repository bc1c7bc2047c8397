"""The watchdog's exit: it must end the process even when the hung call is a log write."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from stockflow.watchdog import EXIT_STUCK


def test_the_watchdog_exits_when_a_log_write_to_a_full_pipe_hangs(tmp_path: Path) -> None:
    """stderr is a pipe nobody reads: a thread's log write blocks holding the handler's lock;
    the watchdog must exit (75) anyway, without taking any logging lock (before: it called
    log.critical and logging.shutdown and hung with the rest)."""
    script = tmp_path / "full_pipe.py"
    script.write_text(
        textwrap.dedent(
            """
            import logging, sys, threading, time
            from stockflow.watchdog import Watchdog

            logging.basicConfig(stream=sys.stderr, level=logging.INFO)
            log = logging.getLogger("hung")

            def chatter():
                while True:  # blocks in write() once the pipe is full, holding the lock
                    log.info("x" * 4096)

            threading.Thread(target=chatter, daemon=True).start()
            time.sleep(1)  # the pipe (64 KiB) is full by now
            watchdog = Watchdog("test", interval=0.05).start()
            with watchdog.deadline("a log write", 0.3):
                log.info("this write hangs too")
            """
        )
    )
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    child = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        began = time.monotonic()
        status = child.wait(timeout=20)  # nobody reads its pipes meanwhile
        took = time.monotonic() - began
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert status == EXIT_STUCK and took < 15, (status, took)
