"""Reload under load: two replicas x two workers on Redis while a reload moves them all."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import shutil
import subprocess
import sys
import time

from benchmarks.serve import REPO, logger
from benchmarks.serve.artifacts import make_artifacts
from benchmarks.serve.load import request_bytes, run_load
from benchmarks.serve.server import index_flags, running, server_env, server_flags


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
