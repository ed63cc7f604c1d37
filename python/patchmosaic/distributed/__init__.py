"""Exact machines beyond one process, over ``torch.distributed`` (gloo on CPUs, NCCL on GPUs), launched with
``torchrun``:

    keys.py      key sharding: :class:`ShardedMachine`, training images spread over ranks
    data_local.py   the data-driven locality machine over key shards (:class:`ShardedDataLocal`)
    queries.py   query sharding: seeds spread over ranks, results gathered; a grid of key x query shards
    launch.py    joining the process group, timeouts, one clear error when a rank dies or stalls

The partial softmax states the ranks exchange and merge are the ops' own type (ops/state.py, SoftmaxState).
"""

from .data_local import ShardedDataLocal
from .keys import ShardedMachine, shard, shard_slice
from .launch import DistributedError, init, launched, shutdown
from . import queries  # (pm.distributed.queries.Layout, as the README writes it)
from ..ops.state import SoftmaxState, merge

__all__ = ["ShardedMachine", "ShardedDataLocal", "shard", "shard_slice", "DistributedError", "init", "launched", "shutdown",
           "SoftmaxState", "merge"]
