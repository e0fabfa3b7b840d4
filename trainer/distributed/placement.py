"""Placement groups for a run's actors: shards and workers spread over the cluster's nodes.

One group holds the shards (one bundle each) and lives as long as the run: when a node dies,
Ray reschedules its bundles on the nodes left and the shard actors restart there. The workers
get a new group at every (re)start, so a node added during the run is used by the workers from
the next restart on.
"""

from __future__ import annotations

import logging

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)


def make_group(
    bundles: list[dict[str, float]], strategy: str, name: str, timeout_s: float
) -> PlacementGroup:
    """A ready placement group of ``bundles`` (``{"CPU": 0.1}``, ...) placed by ``strategy``.

    Raises:
        ValueError: when the cluster cannot place the bundles within ``timeout_s`` seconds.
    """
    group = placement_group(bundles, strategy=strategy, name=name)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(group)
        raise ValueError(
            f"the cluster could not place {len(bundles)} actors of {bundles[0]} with strategy "
            f"{strategy} within {timeout_s:g} s (nodes: {alive_nodes_text()}); add nodes or "
            f"CPUs, lower distributed.shard_cpus / worker_cpus, or use distributed.placement="
            f"PACK."
        ) from None
    return group


def in_group(group: PlacementGroup | None, index: int) -> dict:
    """Actor options that put an actor into bundle ``index`` of ``group`` (none: {})."""
    if group is None:
        return {}
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=index
        )
    }


def remove_group(group: PlacementGroup | None) -> None:
    if group is not None:
        remove_placement_group(group)


def alive_nodes_text() -> str:
    """``<node id prefix> (<CPUs> CPUs), ...`` for the cluster's live nodes."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return ", ".join(
        f"{n['NodeID'][:8]} ({n.get('Resources', {}).get('CPU', 0):g} CPUs)" for n in nodes
    )
