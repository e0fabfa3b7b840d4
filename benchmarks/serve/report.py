"""The serving benchmark's printed tables: the HTTP API runs and reload under load."""

from __future__ import annotations

import os

from benchmarks.common import table


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


def print_towers(args, rows) -> None:
    if not rows:
        return
    print(
        f"### Sequence tower versus mean tower: same items, same saved HNSW index (M={args.m}, "
        f"ef_search={args.ef_search}), one uvicorn process, closed loop, "
        f"{args.connections} connections\n"
    )
    headers = ["tower", "requests", "req/s", "p50 ms", "p99 ms", "server CPU ms/req"]
    print(table([*headers, "x mean tower"], rows))
    print()
