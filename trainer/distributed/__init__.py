"""Ray training: item tables sharded over actors, N trainer workers, rollback on failures.

Layout of a run (``python -m trainer train --num-shards 4 --num-workers 2``), by module::

    plan     the pure arithmetic: resources per actor, seeds, each worker's part of a batch
    worker   ShardedTrainer: one worker's pipelined loop, dense all-reduce (torch.distributed)
    actors   TrainWorker: the Ray actor around a ShardedTrainer
    driver   RayRun: creates the actors, runs the epochs, rolls back on failures
    session  the Ray to use (connected, a cluster, or embedded on 127.0.0.1)

    driver  --creates-->  P ShardActor (trainer.shards.actor), restartable
            --creates-->  N TrainWorker, each a ShardedTrainer + ShardedStore
    TrainWorker r  --pull/push-->  every shard (one call per shard per step, concurrently)
    TrainWorker r  <--all-reduce-->  the other workers' dense gradients (torch.distributed)

Only ``actors``, ``driver`` and ``session`` import Ray.

Semantics.

* Each global batch (``batch_size`` examples, the local trainer's order) is split into N
  contiguous parts; worker ``r`` computes part ``r`` with its own negatives (worker 0 draws
  from ``seed``, so one worker reproduces the in-process trainer exactly). Dense gradients
  are weighted by ``n_r / batch`` and all-reduced (gloo on CPU, nccl on GPU) before every
  worker steps its Adam, so the towers stay identical; row gradients are weighted the same
  way and, in ``sync`` mode, summed by the shards and applied once per step.
* ``sync``: a pull for step ``t`` sees every push of steps < t, so one worker reproduces the
  in-process trainer exactly (tested for every pipeline depth). The pipeline
  (``distributed.pipeline_depth``, default 2): when step ``t`` starts, the pulls of steps
  ``t .. t + depth - 1`` are in flight, and one batch more is prepared while they travel. A
  pull issued before the pushes it must see is answered at once and later *refreshed*: the
  push of step ``t - 1`` carries the refresh of step ``t``'s pull, and the shard answers it in
  the same round trip, once every worker's step ``t - 1`` is in, with only the rows changed
  since (each shard keeps a version per row). ``depth 1`` is the unpipelined order: step
  ``t``'s pull leaves after step ``t - 1``'s push. Pushes are never waited for by the step
  after them; their replies are collected once their effect is needed, and every one before
  a checkpoint and at the end of an epoch (nothing is lost when a worker stops). Shards
  apply a push lazily: the pending updates of the rows a pull reads first, the rest right
  after replying (exact: the optimizer is row-wise, vectorised over rows).
* ``async``: a pull for step ``t`` must see every push of steps <= ``t - 1 - max_staleness``
  and may see later ones: it is stale by at most ``max_staleness`` steps (each worker's own
  and its peers' pushes alike). With the pipeline it is issued up to ``depth - 1`` steps
  early and refreshed, like a sync pull, by the push of step ``t - 1 - max_staleness`` when
  it left before that push; so the bound holds whatever the depth.
* Batch size: every step costs one pull, one push (and one refresh) per shard whatever the
  batch, so larger batches are the way to amortise the calls' overhead (see
  docs/benchmarks.md: at batch 4,096 the sharded trainer matches the in-process one).
* Checkpoints: every ``shard_checkpoint_every`` steps (and ``checkpoint_every`` if set) and
  at every epoch end, all shards write ``<out_dir>/shards/shard-<i>.pt`` (two slots, atomic)
  and then worker 0 writes ``checkpoint.pt`` (a :class:`~trainer.run_state.RunState`: tower,
  optimizer, data position, every worker's sampler generator and the partial epoch's
  losses). ``checkpoint.pt`` is the commit point.
* Failures: a killed shard restarts (Ray ``max_restarts``), reloads its last file and refuses
  requests until the driver has rolled *every* shard and worker back to the step of
  ``checkpoint.pt`` (a shard that came back alone would mix timelines). The workers are
  recreated, the steps since that checkpoint are redone, and the log says which. A killed
  driver resumes with ``--resume`` the same way.
"""
