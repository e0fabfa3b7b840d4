"""Entry point of ``python -m benchmarks.serve``: the steps in order, then the tables."""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import time

from benchmarks.common import machine, table
from benchmarks.serve.artifacts import make_artifacts
from benchmarks.serve.cli import parse_args
from benchmarks.serve.inprocess import raw_throughput, sweep
from benchmarks.serve.load import request_bytes
from benchmarks.serve.profiling import profile
from benchmarks.serve.reload import reload_under_load
from benchmarks.serve.report import print_api, print_reload, print_towers
from benchmarks.serve.server import measured_load, running, server_flags
from benchmarks.serve.towers import compare_towers
from benchmarks.serve.wrk import run_wrk


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
    users = [str(u) for u in model.artifacts.user_ids]

    recall = info.recall
    print(
        f"{model.num_items:,} items, dim {model.dim}, HNSW M={args.m} "
        f"ef_construction={args.ef_construction} ef_search={args.ef_search} "
        f"({info.source} in {info.seconds:.0f}s; model load {load_seconds:.0f}s); "
        f"recall@{recall.k if recall else '?'} = {recall.recall if recall else float('nan'):.3f} "
        f"on {recall.num_queries if recall else 0} user vectors\n"
    )
    ctx = multiprocessing.get_context("spawn")
    if args.only_towers:  # the servers load the saved index; nothing else here is needed
        item_ids = [str(i) for i in model.artifacts.item_ids]
        del model
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            print_towers(args, compare_towers(args, pool, artifacts, users, item_ids))
        return
    if not args.skip_sweep:
        queries = training_user_vectors(model.artifacts, args.sweep_queries)
        rows = sweep(args, model, queries)
        print(f"### Recall@{args.k} versus single-query search speed (1 thread)\n")
        print(
            table(["index", "setting", f"recall@{args.k}", "queries/s", "queries per CPU-s"], rows)
        )
        print()

    db = args.work_dir / f"histories-{artifacts.name}.sqlite"
    store = SQLiteHistoryStore(db, synchronous="NORMAL")
    seed_store(store, model)
    recommender = Recommender(model, store, history_limit=1000)
    users_file = args.work_dir / "users.txt"
    users_file.write_text("\n".join(users) + "\n")
    raw = raw_throughput(recommender, users, args.k, seconds=min(args.duration, 5.0))
    item_ids = [str(i) for i in model.artifacts.item_ids]
    store.close()
    del recommender, model

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
        towers = compare_towers(args, pool, artifacts, users, item_ids) if args.towers else []

    print_api(args, results, raw, closed_two, wrk)
    if profile_rows:
        print("### Per-request server CPU by stage (py-spy samples, wrk closed loop)\n")
        print(table(["stage", "% of samples", "CPU us per request"], profile_rows))
        print()
    print_towers(args, towers)
    if args.reload:
        print_reload(args, reload_under_load(args))


if __name__ == "__main__":
    main()
