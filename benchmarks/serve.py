"""Serving benchmark: real uvicorn servers on 127.0.0.1 under load generators.

    python -m benchmarks.serve                                   # 1M items, dim 64, HNSW
    python -m benchmarks.serve --num-items 100000 --duration 5   # a quick run
    python -m benchmarks.serve --rate 800                        # a fixed offered rate
    python -m benchmarks.serve --skip-sweep --profile 15         # + per-request CPU breakdown
    python -m benchmarks.serve --only-reload                     # reload, 2 replicas x 2 workers

Steps:

1. Artifacts: 1M synthetic items (the trainer's generator, a few thousand users), random seeded
   item tables (low-rank structure, log-normal norms, like trained embeddings) and an untrained
   tower, exported with ``trainer.artifacts.export.export_artifacts``; cached in ``--work-dir``.
2. The HNSW index is built once (recall@10 measured against exact search on the tower's user
   vectors) and saved next to the artifacts, where the server loads it.
3. Recall versus single-query search speed of IVF and HNSW settings (in process, one thread).
4. Raw in-process throughput of the exact work a request does (stored histories from SQLite in
   one read per batch, user tower, FAISS search), one query per call and in batches.
5. The server (``python -m service serve``, one process, `service.launch`) and, in a separate
   process, the load generator: raw asyncio streams over keep-alive connections. Maximum
   throughput is measured closed-loop (each connection sends its next request when the answer
   arrives); latency is measured open-loop: requests are scheduled at fixed times
   ``t0 + i / rate`` whatever the responses, and latency counts from the scheduled time, so a
   stalled server shows in the tail instead of slowing the generator down (no coordinated
   omission). The same closed loop against ``--workers 2`` gives the requests per server
   CPU-second of two worker processes against one.
6. ``wrk`` (an independent load generator in C, when installed), closed loop with
   ``benchmarks/wrk/recommend.lua``.
7. With ``--profile S``: py-spy samples the one-process server for ``S`` seconds of closed-loop
   load; every sample is put in one stage of the request path (`STAGES`) and the server's CPU
   time per request is split by those shares. ``--server-code DIR`` runs the server from another
   checkout (e.g. main before a change) for a before/after comparison.
8. With ``--reload`` (or ``--only-reload``): redis-server, two replicas of two workers each on
   ``--reload-items`` items, closed-loop load on both replicas while a reload through one
   replica moves every process to a second model: failed requests, and the seconds until every
   process serves the new model.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, table

logger = logging.getLogger("benchmarks.serve")

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    p.add_argument("--reload-items", type=int, default=100_000)
    return p.parse_args(argv)


# ---------------------------------------------------------------------- artifacts


def random_tables(num_items: int, dim: int, seed: int) -> dict[str, object]:
    """Seeded item tables shaped like trained ones: low rank + noise, log-normal norms."""
    import torch

    rng = np.random.default_rng(seed)
    rank = 16
    basis = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    out = {}
    for name in ("output", "input"):
        table_ = np.empty((num_items, dim), dtype=np.float32)
        for start in range(0, num_items, 200_000):
            stop = min(num_items, start + 200_000)
            block = rng.standard_normal((stop - start, rank)).astype(np.float32) @ basis
            block += 0.3 * rng.standard_normal((stop - start, dim)).astype(np.float32)
            block *= rng.lognormal(0.0, 0.3, (stop - start, 1)).astype(np.float32)
            table_[start:stop] = block / np.sqrt(dim) * 4
        out[name] = torch.from_numpy(table_)
    out["bias"] = torch.from_numpy((0.1 * rng.standard_normal(num_items)).astype(np.float32))
    return out


def make_artifacts(args: argparse.Namespace, **override: int) -> Path:
    """The benchmark's artifact directory (built once, then reused while it verifies);
    ``num_items=`` / ``seed=`` override the arguments."""
    args = argparse.Namespace(**{**vars(args), **override})
    import torch

    from trainer.artifacts import ArtifactError, verify_artifacts
    from trainer.artifacts.export import export_artifacts
    from trainer.config import load_config
    from trainer.data import load_dataset
    from trainer.train import build_tower

    out = args.work_dir / f"artifacts-{args.num_items}-d{args.dim}-s{args.seed}"
    if (out / "manifest.json").exists():
        try:
            verify_artifacts(out)
            return out
        except ArtifactError as e:
            logger.warning("rebuilding %s: %s", out, e)
    start = time.perf_counter()
    cfg = load_config(
        None,
        [
            f"name=bench{args.num_items}",
            f"data.synthetic.num_items={args.num_items}",
            f"data.synthetic.num_users={args.num_users}",
            "data.synthetic.mean_sequence_length=20",
            f"data.synthetic.seed={args.seed}",
            f"model.embedding_dim={args.dim}",
            "model.hidden=[256]",
            f"seed={args.seed}",
            "progress=false",
        ],
    )
    ds = load_dataset(cfg.data)
    torch.manual_seed(args.seed)
    tower = build_tower(cfg, ds)
    tables = random_tables(ds.num_items, args.dim, args.seed)
    export_artifacts(out, cfg, ds, tower, tables, curves=[], metrics={})
    logger.info("artifacts for %d items in %.0fs", ds.num_items, time.perf_counter() - start)
    return out


# ---------------------------------------------------------------------- in-process measures


def exact_top(model, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids ``[n, k]`` by u·w + b (NumPy, chunked over items)."""
    w = model.artifacts.output_embeddings
    b = model.artifacts.output_biases
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(w), 250_000):
        s = queries @ w[start : start + 250_000].T + b[start : start + 250_000]
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
    order = np.argsort(-best_s, axis=1)[:, :k]
    return np.take_along_axis(best_i, order, 1)


def search_qps(index, queries: np.ndarray, k: int, seconds: float = 2.0) -> tuple[float, float]:
    """Single-query searches per wall second and per CPU second of this thread.

    The CPU figure does not count the time the thread waited for a core, so it stays
    meaningful on a machine shared with other work.
    """
    done, start, cpu = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - start < seconds:
        index.search(queries[done % len(queries)][None, :], k)
        done += 1
    return done / (time.perf_counter() - start), done / (time.thread_time() - cpu)


def recall_of(index, queries: np.ndarray, truth: np.ndarray, k: int) -> float:
    _, ids = index.search(queries, k)
    return float(np.mean([len(set(a) & set(t)) / k for a, t in zip(ids, truth)]))


def sweep(args: argparse.Namespace, model, queries: np.ndarray) -> list[list[object]]:
    """Recall@k and single-query QPS of IVF nprobe and HNSW ef_search settings."""
    from service.index import IndexParams, build_index

    truth = exact_top(model, queries, args.k)
    w, b = model.artifacts.output_embeddings, model.artifacts.output_biases
    rows: list[list[object]] = []
    hnsw = model.index
    for ef in (16, 32, 64, 128, 256, 512):
        hnsw.set_search_params(ef_search=ef)
        rows.append(
            [
                f"HNSW M={args.m}",
                f"ef_search={ef}",
                recall_of(hnsw, queries, truth, args.k),
                *search_qps(hnsw, queries, args.k),
            ]
        )
    hnsw.set_search_params(ef_search=args.ef_search)
    start = time.perf_counter()
    ivf = build_index("ivf", w, b, IndexParams(nlist=args.nlist, num_threads=2))
    logger.info("IVF nlist=%d built in %.0fs", args.nlist, time.perf_counter() - start)
    # (nprobe=1 leaves many queries with fewer than k candidates in the one list they visit:
    # the index then falls back to exact search for them, which is accurate and slow.)
    for nprobe in (4, 8, 16, 32, 64, 128, 256):
        ivf.set_search_params(nprobe=nprobe)
        rows.append(
            [
                f"IVF nlist={args.nlist}",
                f"nprobe={nprobe}",
                recall_of(ivf, queries, truth, args.k),
                *search_qps(ivf, queries, args.k),
            ]
        )
    del ivf
    exact = build_index("exact", w, b, IndexParams(num_threads=1))
    rows.append(["exact (FlatIP)", "-", 1.0, *search_qps(exact, queries, args.k, seconds=3.0)])
    return rows


def raw_throughput(
    recommender, users: list[str], k: int, seconds: float
) -> dict[str, tuple[float, float]]:
    """`Recommender.recommend` in process, one query per call and batches of 32: (queries per
    wall second, queries per CPU second of this thread)."""
    from service.queries import UserQuery

    out = {}
    for batch in (1, 32):
        done, i, start, cpu = 0, 0, time.perf_counter(), time.thread_time()
        while time.perf_counter() - start < seconds:
            queries = [UserQuery(user_id=users[(i + j) % len(users)], k=k) for j in range(batch)]
            recommender.recommend(queries)
            done += batch
            i += batch
        out[f"batch {batch}"] = (
            done / (time.perf_counter() - start),
            done / (time.thread_time() - cpu),
        )
    return out


# ---------------------------------------------------------------------- load generator


def request_bytes(users: list[str], k: int, host: str, port: int) -> list[bytes]:
    out = []
    for user in users:
        body = json.dumps({"user_id": user, "k": k}).encode()
        head = (
            f"POST /v1/recommend HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _load(
    host: str,
    port: int,
    requests: list[bytes],
    rate: float | None,
    duration: float,
    connections: int,
) -> dict[str, object]:
    """Open loop at ``rate`` (scheduled sends) or, with ``rate=None``, closed loop."""
    total = int(rate * duration) if rate else 10**9
    queue: asyncio.Queue = asyncio.Queue()
    latencies: list[float] = []
    errors = 0
    completed = 0
    stop_at = [float("inf")]

    connected = 0
    all_connected = asyncio.Event()

    async def worker() -> None:
        nonlocal errors, completed, connected
        reader, writer = await asyncio.open_connection(host, port)
        connected += 1
        if connected == connections:
            all_connected.set()
        await all_connected.wait()
        try:
            while True:
                if rate:
                    i, scheduled = await queue.get()
                    if i < 0:
                        return
                else:
                    i, scheduled = completed + errors, time.perf_counter()
                    if scheduled >= stop_at[0]:
                        return
                writer.write(requests[i % len(requests)])
                try:
                    status = await _read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status = -1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                latencies.append(time.perf_counter() - scheduled)
                if status == 200:
                    completed += 1
                else:
                    errors += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(worker()) for _ in range(connections)]
    await asyncio.wait_for(all_connected.wait(), timeout=60)
    t0 = time.perf_counter()
    if rate:
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((i, t0 + i / rate))
        for _ in tasks:
            queue.put_nowait((-1, 0.0))
    else:
        stop_at[0] = t0 + duration
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {
        "offered": rate or float("nan"),
        "achieved": completed / elapsed,
        "errors": errors,
        "requests": completed + errors,
        "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p95": float(np.percentile(lat, 95)) if lat.size else float("nan"),
        "p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "max": float(lat.max()) if lat.size else float("nan"),
    }


def run_load(*args: Any) -> dict[str, object]:
    """Entry point of the load-generator process: `_load` of ``args`` under uvloop."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_load(*args))


# ---------------------------------------------------------------------- server


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


# ---------------------------------------------------------------------- wrk


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


# ---------------------------------------------------------------------- profile

# Stage of the request path -> substrings of a stack's frames (file paths, function names). The
# first six are matched anywhere in a stack (work done below them belongs to them); the rest by
# the frame nearest the leaf.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("FAISS search (service/index, faiss)", ("service/index/", "faiss/")),
    ("user tower (torch)", ("trainer/", "torch/")),
    ("store read", ("service/store", "sqlite3", "redis/")),
    ("model: prepare queries, results", ("service/model.py", "service/recommender.py")),
    (
        "response: build, validate, JSON",
        (
            "serialize_response",
            "jsonable_encoder",
            "json/encoder",
            "starlette/responses.py",
            "RecommendResponse",
            "ScoredItemOut",
            "orjson",
            "json_response",
            "routers/recommend.py:answer",
        ),
    ),
    (
        "request: JSON parse, validation, dependencies",
        (
            "fastapi/dependencies",
            "json/decoder",
            "json/__init__",
            "pydantic",
            "service/schemas",
            "service/deps",
            "Request.json",
            "Request.body",
            "parse_body",
            "get_request_handler",
        ),
    ),
    ("HTTP (uvicorn, httptools)", ("uvicorn/protocols", "httptools")),
    ("FastAPI's OpenTelemetry hooks", ("fastapi/telemetry", "opentelemetry", "trace/__init__")),
    (
        "ASGI middleware, routing, metrics",
        (
            "starlette/",
            "fastapi/",
            "service/metrics",
            "service/limits",
            "service/requestid",
            "service/hotpath",
            "prometheus_client",
        ),
    ),
    (
        "event loop, thread hand-off",
        (
            "asyncio/",
            "uvloop",
            "threading.py",
            "concurrent/futures",
            "service/batching",
            "queue.py",
            "anyio/",
        ),
    ),
]
_DEEP = 6


def stage_of(stack: str) -> str:
    """The `STAGES` name of one collapsed stack (``frame;frame;...``, root first)."""
    for name, keys in STAGES[:_DEEP]:
        if any(k in stack for k in keys):
            return name
    for frame in reversed(stack.split(";")):
        for name, keys in STAGES[_DEEP:]:
            if any(k in frame for k in keys):
                return name
    return "other"


def breakdown(raw: str) -> dict[str, float]:
    """Share of the samples per stage, from py-spy's ``--format raw`` output."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if stack:
            name = stage_of(stack)
            counts[name] = counts.get(name, 0) + int(n)
    total = max(1, sum(counts.values()))
    return {name: counts.get(name, 0) / total for name in [*(n for n, _ in STAGES), "other"]}


def profile(server, users_file: Path, args: argparse.Namespace, out: Path) -> list[list[object]]:
    """py-spy on the server while wrk loads it: CPU microseconds per request per stage."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [spy, "record", "--pid", str(server.pid), "--duration", str(int(args.profile))]
    cmd += ["--rate", "200", "--format", "raw", "--nonblocking", "-o", str(out)]
    recorder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wrk_args = argparse.Namespace(**{**vars(args), "duration": args.profile})
    result = run_wrk(server, users_file, wrk_args)
    recorder.wait(timeout=120)
    if result is None or not out.exists():
        return []
    shares = breakdown(out.read_text())
    us = result["cpu_ms"] * 1000
    rows: list[list[object]] = [[name, share * 100, share * us] for name, share in shares.items()]
    rows.append(["total (server CPU per request)", 100.0, us])
    logger.info("profile: %.0f req/s under py-spy", result["rate"])
    return rows


# ---------------------------------------------------------------------- reload across replicas


def model_processes(url: str) -> dict[str, str]:
    """pid -> serving model version of every worker of a replica (its multiprocess metrics)."""
    import httpx

    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("shardrec_model_info{") and line.endswith(" 1.0"):
            labels = dict(
                p.split("=", 1)
                for p in line[len("shardrec_model_info{") :].split("}")[0].split(",")
            )
            found[labels["pid"].strip('"')] = labels["version"].strip('"')
    return found


def reload_under_load(args: argparse.Namespace) -> list[list[object]]:
    """Two replicas x two workers on Redis; load on both while a reload through the second
    moves every process to another model."""
    import httpx

    from service.launch import free_port

    first = make_artifacts(args, num_items=args.reload_items)
    second = make_artifacts(args, num_items=args.reload_items, seed=args.seed + 1)
    with (first / "users.csv").open() as f:
        users = [line.split(",", 1)[0] for line in f.read().splitlines()[1:]]
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        logger.warning("redis-server is not installed: no reload measurement")
        return []
    data = args.work_dir / "redis-reload"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    port = free_port()
    redis = subprocess.Popen(
        [
            redis_bin,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ],
        stdout=(data / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    token = "bench-admin-token-0123456789"
    env = {"SHARDREC_REDIS_URL": f"redis://127.0.0.1:{port}/0", "SHARDREC_ADMIN_TOKEN": token}
    flags = [*server_flags(args, data / "unused.sqlite", 2), "--store", "redis"]
    flags += ["--reload-poll-s", "0.2", "--recall-queries", "100"]
    # Each model's index built once, before the replicas start (else every process builds it).
    for artifacts in (first, second):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "service",
                "index",
                "--artifacts",
                str(artifacts),
                *index_flags(args),
                "--recall-queries",
                "100",
            ],
            cwd=REPO,
            env=server_env(None),
            check=True,
            capture_output=True,
            timeout=1800,
        )
    rows: list[list[object]] = []
    try:
        with contextlib.ExitStack() as stack:
            replicas = [
                stack.enter_context(
                    running(args, first, flags, args.work_dir / f"replica{i}.log", env=env)
                )
                for i in range(2)
            ]
            old = httpx.get(f"{replicas[0].url}/readyz").json()["model_version"]
            deadline = time.monotonic() + 300
            while any(len(model_processes(r.url)) < 2 for r in replicas):
                if time.monotonic() > deadline:
                    raise TimeoutError("the replicas' workers did not all load")
                time.sleep(0.5)
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
                loads = [
                    pool.submit(
                        run_load,
                        "127.0.0.1",
                        r.port,
                        request_bytes(users, args.k, "127.0.0.1", r.port),
                        None,
                        args.duration + 20,
                        args.connections // 2,
                    )
                    for r in replicas
                ]
                time.sleep(5)
                start = time.monotonic()
                answer = httpx.post(
                    f"{replicas[1].url}/v1/admin/reload",
                    json={"artifacts": str(second)},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=600,
                )
                answered = time.monotonic()
                answer.raise_for_status()
                new = answer.json()["model_version"]
                moved = None
                while moved is None and time.monotonic() - answered < 120:
                    seen = [model_processes(r.url) for r in replicas]
                    if all(len(v) == 2 and set(v.values()) == {new} for v in seen):
                        moved = time.monotonic() - answered
                    time.sleep(0.05)
                results = [f.result() for f in loads]
            rows = [
                [
                    f"replica {i + 1} (2 workers)",
                    r["requests"],
                    r["errors"],
                    r["achieved"],
                    r["p99"],
                ]
                for i, r in enumerate(results)
            ]
            rows.append(
                [
                    f"reload {old} -> {new}: answered after {answered - start:.1f}s, "
                    f"every process on it {moved if moved is None else round(moved, 2)}s later",
                    "",
                    "",
                    "",
                    "",
                ]
            )
    finally:
        redis.terminate()
        redis.wait(timeout=30)
    return rows


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"\n## Serving benchmark ({machine()})\n")
    if args.only_reload:
        print_reload(args, reload_under_load(args))
        return
    import torch

    from service.index import IndexSettings, set_num_threads
    from service.loading import load_model, training_user_vectors
    from service.recommender import Recommender, seed_store
    from service.store import SQLiteHistoryStore

    torch.set_num_threads(1)
    artifacts = make_artifacts(args)
    index = IndexSettings(
        kind="hnsw",
        hnsw_m=args.m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        num_threads=2,
        recall_queries=args.sweep_queries,
    )
    start = time.perf_counter()
    model = load_model(artifacts, index)
    info = model.index_info
    load_seconds = time.perf_counter() - start
    set_num_threads(1)
    db = args.work_dir / f"histories-{artifacts.name}.sqlite"
    store = SQLiteHistoryStore(db, synchronous="NORMAL")
    seed_store(store, model)
    recommender = Recommender(model, store, history_limit=1000)
    users = [str(u) for u in model.artifacts.user_ids]
    users_file = args.work_dir / "users.txt"
    users_file.write_text("\n".join(users) + "\n")

    recall = info.recall
    print(
        f"{model.num_items:,} items, dim {model.dim}, HNSW M={args.m} "
        f"ef_construction={args.ef_construction} ef_search={args.ef_search} "
        f"({info.source} in {info.seconds:.0f}s; model load {load_seconds:.0f}s); "
        f"recall@{recall.k if recall else '?'} = {recall.recall if recall else float('nan'):.3f} "
        f"on {recall.num_queries if recall else 0} user vectors\n"
    )
    if not args.skip_sweep:
        queries = training_user_vectors(model.artifacts, args.sweep_queries)
        rows = sweep(args, model, queries)
        print(f"### Recall@{args.k} versus single-query search speed (1 thread)\n")
        print(
            table(["index", "setting", f"recall@{args.k}", "queries/s", "queries per CPU-s"], rows)
        )
        print()

    raw = raw_throughput(recommender, users, args.k, seconds=min(args.duration, 5.0))
    store.close()
    del recommender, model

    ctx = multiprocessing.get_context("spawn")
    results, closed_two, wrk, profile_rows = [], None, None, []
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        flags = server_flags(args, db, args.workers)
        with running(args, artifacts, flags, args.work_dir / "server.log") as server:
            requests = request_bytes(users, args.k, "127.0.0.1", server.port)
            measured_load(pool, server, requests, args, None, args.connections)  # warm-up
            closed = measured_load(pool, server, requests, args, None, args.connections)
            closed["mode"] = f"closed loop, {args.connections} connections (max)"
            results.append(closed)
            fractions = (0.25, 0.5, 0.8)
            rates = [args.rate] if args.rate else [f * closed["achieved"] for f in fractions]
            for rate in rates:
                for run in range(args.repeat):
                    r = measured_load(
                        pool, server, requests, args, float(rate), args.open_connections
                    )
                    r["mode"] = f"open loop, {r['offered']:.0f}/s (run {run + 1})"
                    results.append(r)
            if not args.skip_wrk:
                wrk = run_wrk(server, users_file, args)
            if args.profile > 0:
                profile_rows = profile(server, users_file, args, args.work_dir / "profile.raw")
        if not args.skip_workers and args.workers == 1:
            flags = server_flags(args, db, 2)
            with running(args, artifacts, flags, args.work_dir / "server-2.log") as server:
                requests = request_bytes(users, args.k, "127.0.0.1", server.port)
                measured_load(pool, server, requests, args, None, args.connections)  # warm-up
                closed_two = measured_load(pool, server, requests, args, None, args.connections)

    print_api(args, results, raw, closed_two, wrk)
    if profile_rows:
        print("### Per-request server CPU by stage (py-spy samples, wrk closed loop)\n")
        print(table(["stage", "% of samples", "CPU us per request"], profile_rows))
        print()
    if args.reload:
        print_reload(args, reload_under_load(args))


def print_api(args, results, raw, closed_two, wrk) -> None:
    print(
        f"### HTTP API (uvicorn, {args.workers} process(es), compute threads "
        f"{args.compute_threads}, micro-batch {args.micro_batch}; load generator in another "
        "process)\n"
    )
    headers = ["load", "achieved req/s", "errors", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    headers += ["server CPU ms/req", "mean batch", "load avg"]
    keys = ["achieved", "errors", "p50", "p95", "p99", "max", "cpu_ms", "batch", "loadavg"]
    print(table(headers, [[r["mode"], *(r[k] for k in keys)] for r in results]))
    print()
    max_api = results[0]["achieved"]
    api_per_cpu = 1000.0 / results[0]["cpu_ms"]  # requests per server CPU-second at max load
    print("### API versus raw in-process throughput (same store read + tower + FAISS search)\n")
    print(
        table(
            ["path", "requests/s", "API / this", "requests per CPU-s", "API / this (CPU)"],
            [["HTTP API (max, closed loop)", max_api, 1.0, api_per_cpu, 1.0]]
            + [
                [f"in process, {name}", wall, max_api / wall, cpu, api_per_cpu / cpu]
                for name, (wall, cpu) in raw.items()
            ],
        )
    )
    print()
    if closed_two is not None:
        two_per_cpu = 1000.0 / closed_two["cpu_ms"]
        print("### One worker process versus two (closed loop, same load generator)\n")
        print(
            table(
                [
                    "server",
                    "req/s",
                    "p99 ms",
                    "server CPU ms/req",
                    "requests per CPU-s",
                    "/ 1 worker",
                ],
                [
                    [
                        "--workers 1",
                        max_api,
                        results[0]["p99"],
                        results[0]["cpu_ms"],
                        api_per_cpu,
                        1.0,
                    ],
                    [
                        "--workers 2",
                        closed_two["achieved"],
                        closed_two["p99"],
                        closed_two["cpu_ms"],
                        two_per_cpu,
                        two_per_cpu / api_per_cpu,
                    ],
                ],
            )
        )
        print()
    if wrk is not None:
        print(f"### wrk -t1 -c{args.connections} (benchmarks/wrk/recommend.lua), one process\n")
        print(
            table(
                [
                    "req/s",
                    "non-2xx",
                    "socket errors",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "server CPU ms/req",
                ],
                [
                    [
                        wrk["rate"],
                        wrk["non2xx"],
                        wrk["errors"],
                        wrk["p50"],
                        wrk["p90"],
                        wrk["p99"],
                        wrk["cpu_ms"],
                    ]
                ],
            )
        )
        print()
    print(
        "(requests per CPU-s: the server's CPU time per request, all its threads and processes; "
        f"in process one thread; load average at the end: {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores)\n"
    )


def print_reload(args, rows) -> None:
    if not rows:
        return
    print(
        f"### Reload under load: 2 replicas x 2 workers, Redis store, {args.reload_items:,} items "
        "(closed loop on both replicas)\n"
    )
    print(table(["replica", "requests", "failed", "req/s", "p99 ms"], rows))
    print()


if __name__ == "__main__":
    main()
