"""Benchmark servers: their flags, environment and launch, and their CPU and batch counters."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from benchmarks.serve import REPO
from benchmarks.serve.load import run_load


def index_flags(args: argparse.Namespace) -> list[str]:
    """The HNSW index of the benchmark, as ``serve`` / ``index`` flags."""
    return ["--kind", "hnsw", "--m", str(args.m), "--ef-construction", str(args.ef_construction)]


def server_flags(args: argparse.Namespace, db: Path, workers: int) -> list[str]:
    return [
        "--db-path",
        str(db),
        *index_flags(args),
        "--ef-search",
        str(args.ef_search),
        "--faiss-threads",
        "1",
        "--torch-threads",
        "1",
        "--compute-threads",
        str(args.compute_threads),
        "--micro-batch",
        str(args.micro_batch),
        "--no-access-log",
        "--log-level",
        "WARNING",
        "--workers",
        str(workers),
    ]


def server_env(code: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDREC_")}
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # idle OpenMP threads must not spin on shared cores
    if code is not None:
        env["PYTHONPATH"] = str(code)
    return {**env, **(extra or {})}


@contextlib.contextmanager
def running(args: argparse.Namespace, artifacts: Path, flags: list[str], log: Path, **kw):
    """A ready `service.launch.LocalServer` (from ``--server-code`` when given)."""
    from service.launch import launch

    code = args.server_code.resolve() if args.server_code else None
    env = server_env(code, kw.pop("env", None))
    with launch(artifacts, log, 900, flags=flags, env=env, cwd=code or REPO, **kw) as (srv, _):
        yield srv


def _process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its children (uvicorn's workers)."""
    cpu = 0.0
    for proc in _process_tree(pid):
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu


def server_counters(pid: int, port: int) -> dict[str, float]:
    """CPU seconds used by the server processes so far, and the batch counters (summed over
    the worker processes by the multiprocess metrics)."""
    import httpx

    out = {"cpu": cpu_seconds(pid), "batches": 0.0, "queries": 0.0}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith("shardrec_batch_size_count"):
            out["batches"] += float(line.split()[-1])
        elif line.startswith("shardrec_batch_size_sum"):
            out["queries"] += float(line.split()[-1])
    return out


def measured_load(pool, server, requests: list[bytes], args, rate: float | None, conns: int):
    """One load run (in the generator process) with the server's CPU per request and mean
    micro-batch over it."""
    before = server_counters(server.pid, server.port)
    result = pool.submit(
        run_load, "127.0.0.1", server.port, requests, rate, args.duration, conns
    ).result()
    after = server_counters(server.pid, server.port)
    done = max(1, result["requests"])
    result["cpu_ms"] = (after["cpu"] - before["cpu"]) / done * 1000
    batches = after["batches"] - before["batches"]
    result["batch"] = (after["queries"] - before["queries"]) / max(1, batches)
    result["loadavg"] = os.getloadavg()[0]
    return result
