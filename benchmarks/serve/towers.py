"""Step 9 (``--towers``): ``/v1/recommend`` with the sequence tower against the mean tower, on
the same items and the same saved HNSW index.

Both towers' artifacts hold the same seeded item tables (`artifacts.random_tables`), so the
mean tower's saved index (its fingerprint included) is copied into the sequence tower's
artifacts and each server loads the very same graph. Each server is measured closed-loop, after
a warm-up run, with two request mixes: known users (their stored training histories, as in the
main table) and explicit 50-item histories in the request (``{"history": [...], "k": k}``, the
sequence tower's full attention window). The ratio is the sequence tower's throughput over the
mean tower's for the same mix.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from benchmarks.serve import logger
from benchmarks.serve.artifacts import make_artifacts
from benchmarks.serve.load import recommend_request, request_bytes
from benchmarks.serve.server import measured_load, running, server_flags

TOWERS = ("mean", "sequence")


def share_index(source: Path, target: Path) -> list[str]:
    """Copy ``source``'s saved index directories (``index-*``) into ``target`` (replacing
    any there); the names copied. Raises if ``source`` has none."""
    names = sorted(p.name for p in source.glob("index-*") if p.is_dir())
    if not names:
        raise FileNotFoundError(
            f"expected a saved index (index-*) in {source}, found none; load the mean tower's "
            "model once (which builds and saves it) before comparing the towers."
        )
    for name in names:
        shutil.rmtree(target / name, ignore_errors=True)
        shutil.copytree(source / name, target / name)
    return names


def history_requests(
    item_ids: list[str], length: int, k: int, port: int, count: int, seed: int
) -> list[bytes]:
    """``count`` requests, each an explicit history of ``length`` distinct random items."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        picks = rng.choice(len(item_ids), size=length, replace=False)
        payload = {"history": [item_ids[i] for i in picks], "k": k}
        out.append(recommend_request(payload, "127.0.0.1", port))
    return out


def compare_towers(
    args: argparse.Namespace,
    pool,
    mean_artifacts: Path,
    users: list[str],
    item_ids: list[str],
    history_length: int = 50,
) -> list[list[object]]:
    """Rows ``[tower, mix, req/s, p50, p99, server CPU ms/req, x mean]`` (see the module)."""
    seq_artifacts = make_artifacts(args, tower="sequence")
    copied = share_index(mean_artifacts, seq_artifacts)
    logger.info("sequence tower artifacts %s share the index %s", seq_artifacts, copied)
    measured: dict[tuple[str, str], dict] = {}
    for tower, artifacts in zip(TOWERS, (mean_artifacts, seq_artifacts), strict=True):
        db = args.work_dir / f"histories-towers-{artifacts.name}.sqlite"
        flags = server_flags(args, db, 1)
        with running(args, artifacts, flags, args.work_dir / f"server-{tower}.log") as server:
            mixes = {
                "known users (stored histories)": request_bytes(
                    users, args.k, "127.0.0.1", server.port
                ),
                f"{history_length}-item history in the request": history_requests(
                    item_ids, history_length, args.k, server.port, 2000, args.seed
                ),
            }
            for mix, requests in mixes.items():
                measured_load(pool, server, requests, args, None, args.connections)  # warm-up
                result = measured_load(pool, server, requests, args, None, args.connections)
                if result["errors"]:
                    raise RuntimeError(
                        f"{result['errors']} failed requests against the {tower} tower "
                        f"({mix}); see {args.work_dir / f'server-{tower}.log'}"
                    )
                measured[tower, mix] = result
    rows = []
    for (tower, mix), r in measured.items():
        ratio = r["achieved"] / measured["mean", mix]["achieved"]
        rows.append([tower, mix, r["achieved"], r["p50"], r["p99"], r["cpu_ms"], ratio])
    return rows
