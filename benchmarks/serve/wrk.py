"""The wrk run: ``wrk -t1`` with benchmarks/wrk/recommend.lua against a running server."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from benchmarks.serve import REPO, logger
from benchmarks.serve.server import cpu_seconds


def run_wrk(server, users_file: Path, args: argparse.Namespace) -> dict[str, float] | None:
    """``wrk -t1 -c<connections>`` with benchmarks/wrk/recommend.lua (None without wrk)."""
    binary = shutil.which("wrk")
    if binary is None:
        logger.warning("wrk is not installed (apt-get install -y wrk): no wrk run")
        return None
    script = REPO / "benchmarks" / "wrk" / "recommend.lua"
    cmd = [binary, "-t1", f"-c{args.connections}", f"-d{max(1, int(args.duration))}s"]
    cmd += ["-s", str(script), server.url, "--", str(users_file), str(args.k)]
    before = cpu_seconds(server.pid)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    cpu = cpu_seconds(server.pid) - before
    found: dict[str, float] = {}
    for line in out.splitlines():
        if line.startswith(("wrk-summary", "wrk-latency-ms")):
            found.update({k: float(v) for k, v in (f.split("=") for f in line.split()[1:])})
    found["rate"] = found["requests"] / found["seconds"]
    found["cpu_ms"] = cpu / max(1.0, found["requests"]) * 1000
    return found
