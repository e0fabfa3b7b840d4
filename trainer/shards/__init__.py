"""The item tables sharded over processes: shard server, two-slot files, transports, client.

* :mod:`trainer.shards.server`: :class:`~trainer.shards.server.ShardServer`, everything one
  shard does besides transport (fencing with a token, sync/async bookkeeping, lazy updates,
  checkpoints), around an :class:`~trainer.embeddings.EmbeddingShard`.
* :mod:`trainer.shards.slots`: the two-slot checkpoint files a shard writes.
* :mod:`trainer.shards.local` and :mod:`trainer.shards.actor`: the transports, servers in this
  process or Ray actors (the only module here that imports Ray).
* :mod:`trainer.shards.client`: :class:`~trainer.shards.client.ShardedStore`, the trainer's
  view of all shards, with :class:`~trainer.embeddings.LocalStore`'s interface.

Consistency model. A pull for step ``t`` carries ``need = t - 1 - staleness``: the shard answers
once every worker's pushes up to step ``need`` are applied (``sync`` mode: ``staleness = 0``,
so a pull always sees every earlier push, whatever order Ray delivers the calls in). The shard
waits for that condition itself (:meth:`ShardServer.ready`), so correctness never depends on
Ray's actor-call ordering, which is not guaranteed for async actors or retried calls. A pull
issued earlier than that (the pipeline) is answered at once and then refreshed: the shard keeps
a version per row and sends, once step ``need`` is applied, only the rows changed since the
pull (:meth:`ShardServer.refresh`), so an early pull ends up exactly as a late one would.

Shapes: ``N`` ids in a request, ``D`` a table's row size (tables of size 0 are vectors
``[N]``), ``P`` shards.
"""
