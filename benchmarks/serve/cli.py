"""The serving benchmark's command line: its flags and their defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import serve
from benchmarks.serve import REPO


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # prog: the usage line names the benchmark as it did when it was one file, serve.py.
    p = argparse.ArgumentParser(prog="serve.py", description=serve.__doc__.split("\n")[0])
    p.add_argument("--num-items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--num-users", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-serve")
    p.add_argument("--m", type=int, default=32, help="HNSW graph degree")
    p.add_argument("--ef-construction", type=int, default=64)
    p.add_argument("--ef-search", type=int, default=64, help="HNSW ef_search of the server")
    p.add_argument("--nlist", type=int, default=1024, help="IVF lists of the sweep")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per load run")
    p.add_argument("--rate", type=float, help="offered rate (default: half the max)")
    p.add_argument("--connections", type=int, default=64, help="closed-loop connections")
    p.add_argument("--open-connections", type=int, default=64, help="open-loop connections")
    p.add_argument("--repeat", type=int, default=2, help="runs per open-loop rate")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--compute-threads", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--skip-sweep", action="store_true", help="no recall-versus-QPS table")
    p.add_argument("--sweep-queries", type=int, default=500)
    p.add_argument("--skip-workers", action="store_true", help="no --workers 2 comparison")
    p.add_argument("--skip-wrk", action="store_true", help="no wrk run")
    p.add_argument("--profile", type=float, default=0.0, help="py-spy seconds (0: none)")
    p.add_argument("--server-code", type=Path, help="checkout the server runs from")
    p.add_argument("--reload", action="store_true", help="also: reload under load, 2 x 2")
    p.add_argument("--only-reload", action="store_true", help="only the reload measurement")
    p.add_argument("--towers", action="store_true", help="also: sequence vs mean tower, same index")
    p.add_argument("--only-towers", action="store_true", help="only the tower comparison")
    p.add_argument("--reload-items", type=int, default=100_000)
    return p.parse_args(argv)
