"""The data-driven locality machine (:class:`patchmosaic.DataLocal`) over key shards: the ELS softmax of a
:class:`ShardedMachine`, each call with the neighbourhood that the Wiener filter of the whole data set picks
(machines/locality.py). The masks come from second-order statistics, cheap to compute on every rank from all
the images; only the softmax over the training patches is sharded."""

from __future__ import annotations

import json
from typing import Optional

from ..machines.locality import DataDrivenCalls, Neighbourhoods, check_statistics
from ..schedules import ScheduleLike
from . import launch
from .keys import ShardedMachine, error_of, raise_shared


class ShardedDataLocal(DataDrivenCalls, ShardedMachine):
    """:class:`patchmosaic.DataLocal` with its training images spread over the ranks of ``group`` (a collective
    machine, as :class:`ShardedMachine`): every rank gives its slice of the training images and the same
    ``statistics`` (all the images, or any set of the data's shape), and every rank gets the one-process
    machine's result.

    Args:
        images: this rank's training images ``(N_r, C, H, W)`` (``N_r = 0`` allowed).
        labels: their ``(N_r,)`` labels, or None (default).
        statistics: the images whose covariance defines the neighbourhoods, the same on every rank (a
            one-process ``DataLocal`` over all the images uses all of them).
        group, schedule, backend, n_threads, max_memory, data_digest: as for :class:`ShardedMachine`.
        boundary, per_pixel, window, weighting: as for :class:`patchmosaic.DataLocal`.
    """

    def __init__(self, images, labels=None, *, statistics, group=None, boundary: str = "zeros",
                 per_pixel: bool = False, window: Optional[int] = None, weighting: str = "binary",
                 schedule: ScheduleLike = "cosine_legacy", backend: str = "auto", n_threads: int = 0,
                 max_memory: Optional[int] = None, data_digest: Optional[str] = None):
        super().__init__("els", images, labels, group=group, boundary=boundary, schedule=schedule, backend=backend,
                         n_threads=n_threads, max_memory=max_memory, data_digest=data_digest)
        self.machine_type = "DataLocal"  # describe() as the one-process machine: runs resume across rank counts
        error, rule = None, None
        try:  # (a failure on one rank raised on every rank; the rules compared: they must be one machine's)
            self.neighbourhood = Neighbourhoods(statistics, boundary=boundary, per_pixel=per_pixel, window=window,
                                                weighting=weighting, schedule=self.schedule, max_memory=max_memory)
            check_statistics(self.neighbourhood, self.C, self.H, self.W)
            rule = self.neighbourhood.describe()
        except Exception as e:
            error = e
        infos = self._all_gather_object((error_of(error), rule), "exchange of the neighbourhood rules")
        raise_shared(error, [i[0] for i in infos], "building the neighbourhoods")
        if any(i[1] != infos[0][1] for i in infos):
            groups = {}
            for r, (_, d) in enumerate(infos):
                groups.setdefault(json.dumps(d, sort_keys=True, default=str), []).append(r)
            raise launch.RanksDisagree(
                "ShardedDataLocal: the ranks' neighbourhood rules differ (statistics, window, weighting or "
                "per_pixel): " + "; ".join(f"ranks {rs}: {d}" for d, rs in groups.items())
                + "; every rank passes the same statistics (e.g. all the images) and settings")
        self.wiener = self.neighbourhood.wiener

    def __repr__(self):
        return "ShardedDataLocal" + super().__repr__()[len("ShardedMachine"):]
