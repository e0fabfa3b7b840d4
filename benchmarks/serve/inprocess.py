"""In-process measures: exact top-k, the recall-versus-QPS sweep, raw recommend throughput."""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.serve import logger


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
