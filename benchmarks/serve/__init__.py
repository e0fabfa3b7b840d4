"""Serving benchmark: real uvicorn servers on 127.0.0.1 under load generators.

    python -m benchmarks.serve                                   # 1M items, dim 64, HNSW
    python -m benchmarks.serve --num-items 100000 --duration 5   # a quick run
    python -m benchmarks.serve --rate 800                        # a fixed offered rate
    python -m benchmarks.serve --skip-sweep --profile 15         # + per-request CPU breakdown
    python -m benchmarks.serve --only-reload                     # reload, 2 replicas x 2 workers
    python -m benchmarks.serve --only-towers                     # sequence vs mean tower

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
   load; every sample is put in one stage of the request path (`profiling.STAGES`) and the
   server's CPU time per request is split by those shares. ``--server-code DIR`` runs the server
   from another checkout (e.g. main before a change) for a before/after comparison.
8. With ``--reload`` (or ``--only-reload``): redis-server, two replicas of two workers each on
   ``--reload-items`` items, closed-loop load on both replicas while a reload through one
   replica moves every process to a second model: failed requests, and the seconds until every
   process serves the new model.
9. With ``--towers`` (or ``--only-towers``): the same closed loop against a server of the
   sequence tower and one of the mean tower, on the same items and the same saved index, for
   known users and for explicit 50-item histories (`towers`).

Modules: ``cli`` (flags), ``artifacts`` (synthetic artifacts), ``inprocess`` (steps 2 to 4),
``load`` (the HTTP load generator), ``server`` (server processes, their CPU and counters),
``wrk`` (step 6), ``profiling`` (step 7), ``reload`` (step 8), ``towers`` (step 9), ``report``
(the printed tables) and ``__main__`` (the run, in the order above).
"""

import logging
from pathlib import Path

logger = logging.getLogger("benchmarks.serve")

REPO = Path(__file__).resolve().parents[2]
