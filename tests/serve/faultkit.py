"""Fault-suite helpers: a `verakit serve` process the test may kill, starve or flood, and a tally of answers.

Unlike `cases.Server`, the process's output goes to a pipe drained into memory (a file-size limit put on
the server, for the disk-full case, must not hit its log), and the test gets the process itself: its pid
for SIGKILL / SIGTERM / prlimit and its resident memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serve.cases import REPO, free_port

RESULTS = os.environ.get("VERAKIT_FAULT_RESULTS")  # append each case's tally here (JSON lines) when set


class Proc:
    """`verakit serve ARGS` on a free loopback port, up once /health answers 200."""

    def __init__(self, args: list[str], timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "verakit.cli", "serve", "--port", str(self.port), "--threads", "1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        )
        self.lines: list[str] = []
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not come up in {timeout} s:\n{self.log[-3000:]}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mib(self) -> float:
        """Resident memory of the server process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._drain.join(5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain.join(5)


@dataclass
class Tally:
    """What a fault case sent and how each request ended: an HTTP status, or the client-side error."""

    case: str
    sent: int = 0
    outcomes: Counter = field(default_factory=Counter)
    lost: int = 0  # requests answered 200 whose answer was wrong, or stored data found damaged
    figures: dict = field(default_factory=dict)

    def add(self, outcome: int | str) -> None:
        self.sent += 1
        self.outcomes[str(outcome)] += 1

    def answered(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k.isdigit())

    def report(self) -> dict:
        """Print the case's line (pytest -s shows it) and append it to $VERAKIT_FAULT_RESULTS."""
        row = {"case": self.case, "sent": self.sent, "answered": self.answered(),
               "by_outcome": dict(sorted(self.outcomes.items())), "data_lost": self.lost, **self.figures}
        print(f"FAULT {json.dumps(row)}")
        if RESULTS:
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")
