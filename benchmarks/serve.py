"""Serving benchmark: a real uvicorn server on 127.0.0.1 under a constant-rate load generator.

    python -m benchmarks.serve                                   # 1M items, dim 64, HNSW
    python -m benchmarks.serve --num-items 100000 --duration 5   # a quick run
    python -m benchmarks.serve --rate 800                        # a fixed offered rate

Steps:

1. Artifacts: 1M synthetic items (the trainer's generator, a few thousand users), random seeded
   item tables (low-rank structure, log-normal norms, like trained embeddings) and an untrained
   tower, exported with ``trainer.artifacts.export.export_artifacts``; cached in ``--work-dir``.
2. The HNSW index is built once (recall@10 measured against exact search on the tower's user
   vectors) and saved next to the artifacts, where the server loads it.
3. Recall versus single-query search speed of IVF and HNSW settings (in process, one thread).
4. Raw in-process throughput of the exact work a request does (stored history from SQLite,
   user tower, FAISS search), one query per call and in batches.
5. The server (``python -m service serve``, one process) and, in a separate process, the load
   generator: raw asyncio streams over keep-alive connections. Maximum throughput is measured
   closed-loop (each connection sends its next request when the answer arrives); latency is
   measured open-loop: requests are scheduled at fixed times ``t0 + i / rate`` whatever the
   responses, and latency counts from the scheduled time, so a stalled server shows in the
   tail instead of slowing the generator down (no coordinated omission).
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
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def make_artifacts(args: argparse.Namespace) -> Path:
    """The benchmark's artifact directory (built once, then reused while it verifies)."""
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


def run_load(
    host: str,
    port: int,
    requests: list[bytes],
    rate: float | None,
    duration: float,
    connections: int,
) -> dict[str, object]:
    """Entry point of the load-generator process."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_load(host, port, requests, rate, duration, connections))


# ---------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, artifacts: Path, db: Path, port: int, log: Path):
    cmd = [
        sys.executable,
        "-m",
        "service",
        "serve",
        "--artifacts",
        str(artifacts),
        "--port",
        str(port),
        "--db-path",
        str(db),
        "--kind",
        "hnsw",
        "--m",
        str(args.m),
        "--ef-construction",
        str(args.ef_construction),
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
        str(args.workers),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDREC_")}
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # idle OpenMP threads must not spin on shared cores
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"server not ready; see {log}")


def _process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def server_counters(pid: int, port: int) -> dict[str, float]:
    """CPU seconds used by the server processes so far, and the batch counters of the worker
    that answers /metrics (all of them when there is one worker)."""
    import httpx

    cpu = 0.0
    for proc in _process_tree(pid):  # uvicorn workers are children of the supervisor
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    out = {"cpu": cpu, "batches": 0.0, "queries": 0.0}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith("shardrec_batch_size_count "):
            out["batches"] = float(line.split()[1])
        elif line.startswith("shardrec_batch_size_sum "):
            out["queries"] = float(line.split()[1])
    return out


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    import torch

    from service.index import IndexSettings, set_num_threads
    from service.loading import load_model, training_user_vectors
    from service.recommender import Recommender, seed_store
    from service.store import HistoryStore

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
    store = HistoryStore(db, synchronous="NORMAL")
    seed_store(store, model)
    recommender = Recommender(model, store, history_limit=1000)
    users = [str(u) for u in model.artifacts.user_ids]

    print(f"\n## Serving benchmark ({machine()})\n")
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

    port = free_port()
    log = args.work_dir / "server.log"
    server = start_server(args, artifacts, db, port, log)
    ctx = multiprocessing.get_context("spawn")
    requests = request_bytes(users, args.k, "127.0.0.1", port)
    results = []
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:

            def load(rate: float | None, connections: int) -> dict:
                before = server_counters(server.pid, port)
                result = pool.submit(
                    run_load, "127.0.0.1", port, requests, rate, args.duration, connections
                ).result()
                after = server_counters(server.pid, port)
                done = max(1, result["requests"])
                result["cpu_ms"] = (after["cpu"] - before["cpu"]) / done * 1000
                batches = after["batches"] - before["batches"]
                result["batch"] = (after["queries"] - before["queries"]) / max(1, batches)
                result["loadavg"] = os.getloadavg()[0]
                return result

            load(None, args.connections)  # warm-up (caches, allocator, page cache)
            closed = load(None, args.connections)
            closed["mode"] = f"closed loop, {args.connections} connections (max)"
            results.append(closed)
            fractions = (0.25, 0.5, 0.8)
            rates = [args.rate] if args.rate else [f * closed["achieved"] for f in fractions]
            for rate in rates:
                for run in range(args.repeat):
                    r = load(float(rate), args.open_connections)
                    r["mode"] = f"open loop, {r['offered']:.0f}/s (run {run + 1})"
                    results.append(r)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    print(
        f"### HTTP API (uvicorn, {args.workers} process(es), compute threads "
        f"{args.compute_threads}, micro-batch {args.micro_batch}; load generator in another "
        "process)\n"
    )
    print(
        table(
            [
                "load",
                "achieved req/s",
                "errors",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "max ms",
                "server CPU ms/req",
                "mean batch",
                "load avg",
            ],
            [
                [
                    r["mode"],
                    r["achieved"],
                    r["errors"],
                    r["p50"],
                    r["p95"],
                    r["p99"],
                    r["max"],
                    r["cpu_ms"],
                    r["batch"],
                    r["loadavg"],
                ]
                for r in results
            ],
        )
    )
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
    print(
        "\n(requests per CPU-s: the server's CPU time per request, all its threads, in process "
        f"one thread; load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
        "cores)"
    )


if __name__ == "__main__":
    main()
