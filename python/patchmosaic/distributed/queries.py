"""Query sharding: noise seeds spread over the ranks, results gathered on every rank; combined with key sharding
as a grid of ranks.

A :class:`Layout` splits the ``W`` ranks of a job into ``Q = W / K`` query shards of ``K`` ranks each: rank
``r`` is key shard ``r % K`` of query shard ``r // K``. The ``K`` ranks of a query shard hold the training images
between them (a :class:`ShardedMachine` over their group, or a plain machine when ``K = 1``) and work on the same
seeds; the ``Q`` query shards work on disjoint slices of the seeds. ``K = W`` (the default) is pure key
sharding, ``K = 1`` pure query sharding, ``W = 4, K = 2`` a 2 x 2 grid.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import launch
from .keys import KINDS, ShardedMachine, shard_slice

KEY_SHARDS_ENV = "PATCHMOSAIC_KEY_SHARDS"


class Layout:
    """How the ranks of the job split the work: key shards times query shards.

    Args:
        key_shards: ranks that share the training images of one machine (a divisor of the world size); None
            (default): ``$PATCHMOSAIC_KEY_SHARDS``, else every rank (pure key sharding). 1: pure query sharding.
    """

    def __init__(self, key_shards: Optional[int] = None):
        self.world, self.rank = launch.world(), launch.rank()
        where = "key_shards (--key-shards)"
        if key_shards is None:
            where, key_shards = f"${KEY_SHARDS_ENV}", os.environ.get(KEY_SHARDS_ENV, self.world)
        try:
            K = int(key_shards)
        except (TypeError, ValueError):
            raise ValueError(f"{where} is a number of ranks, got {key_shards!r}") from None
        if isinstance(key_shards, bool) or K != key_shards and not isinstance(key_shards, str):
            raise ValueError(f"{where} is a whole number of ranks, got {key_shards!r}")
        if K < 1 or self.world % K:
            raise ValueError(f"key_shards must divide the {self.world} rank(s), got {K} (from {where})")
        self.n_key, self.n_query = K, self.world // K
        self.key_index, self.query_index = self.rank % K, self.rank // K
        self._key_group, self._groups_made = None, False
        self.agreed = False  # whether agree() has run (the CLI's first collective)

    @property
    def key_group(self):
        """The process group of this rank's key shards (None: the world, when every rank is a key shard). Made on
        first use, by every rank (the ranks must agree on the layout first: see :meth:`agree`)."""
        if not self._groups_made:
            K = self.n_key
            if 1 < K < self.world:
                for q in range(self.n_query):  # every rank creates every group, in the same order
                    g = dist.new_group(list(range(q * K, (q + 1) * K)))
                    if q == self.query_index:
                        self._key_group = g
            self._groups_made = True
        return self._key_group

    def agree(self, fields: Optional[dict] = None, what: str = "the run", error: Optional[str] = None) -> None:
        """:func:`patchmosaic.distributed.launch.agree` over the world, with the layout itself among the fields:
        before the first collective of a run, every rank checks that all were given the same ``fields`` (or learns
        which rank failed before the run, ``error``). Raises ``RanksDisagree`` (a ValueError) naming the fields and
        ranks that differ.

        Args:
            fields: what must match across the ranks (settings, digests of data, seeds and labels).
            what: the run, for the message.
            error: this rank's error before the run, if any.
        """
        full = None if fields is None else dict(fields, key_shards=self.n_key, world=self.world)
        try:
            launch.agree(full, what, error=error)
        finally:
            self.agreed = True

    @property
    def leader(self) -> bool:
        """Whether this is rank 0 of the job (the one that writes files and prints)."""
        return self.rank == 0

    def seeds(self, M: int) -> slice:
        """The slice of ``M`` seeds this rank's query shard works on.

        Args:
            M: number of seeds.
        """
        return shard_slice(M, self.query_index, self.n_query)

    def machine(self, name: str, images, labels=None, **kwargs):
        """The machine of this rank over all ``images`` (every rank passes all of them): a plain machine when
        there is one key shard, else a key-sharded one over this rank's slice.

        Args:
            name: ``"els"``, ``"ls"``, ``"is"``, ``"datalocal"`` (key-sharded when there are several key shards:
                a :class:`ShardedMachine`, or a :class:`ShardedDataLocal` whose neighbourhoods come from all the
                images) or ``"wiener"`` (built whole on every rank: a mean and a covariance).
            images: all the training images ``(N, C, H, W)``.
            labels: their labels, or None (default).
            kwargs: ``boundary``, ``schedule``, ``backend``, ``n_threads``, ``max_memory`` as for
                :func:`patchmosaic.machines.make_machine`.
        """
        from ..io.runstate import array_digest
        from ..machines import make_machine
        from ..validation import to_labels, to_tensor

        if self.n_key == 1 or name == "wiener":  # the Wiener filter: mean and covariance, cheap on every rank
            return make_machine(name, images, labels, **kwargs)
        if name not in KINDS and name != "datalocal":
            raise ValueError(f"machine {name!r} cannot be key-sharded (the sharded machines are "
                             f"{tuple(KINDS) + ('datalocal',)}); run it with one key shard (--key-shards 1)")
        lab = None if labels is None else to_labels(labels, len(images))
        digest = array_digest(to_tensor(images, "images"), lab)
        sl = shard_slice(len(images), self.key_index, self.n_key)
        if name == "datalocal":
            from .data_local import ShardedDataLocal

            return ShardedDataLocal(images[sl], None if lab is None else lab[sl], statistics=images,
                                    group=self.key_group, data_digest=digest, **kwargs)
        return ShardedMachine(name, images[sl], None if lab is None else lab[sl], group=self.key_group,
                              data_digest=digest, **kwargs)

    def gather(self, part, M: int, what: str = "gather of the results"):
        """The full ``(M, ...)`` result on every rank from each query shard's slice ``part`` (a tensor, numpy
        array or None for an empty slice); the key shard 0 of each query shard contributes.

        Args:
            part: this rank's slice of the result (rows ``self.seeds(M)``).
            M: number of seeds.
            what: what is gathered, for an error message.
        """
        if self.world == 1:
            return part
        mine = None
        if self.key_index == 0 and part is not None:
            mine = part.detach().cpu() if torch.is_tensor(part) else np.asarray(part)
        parts = [None] * self.world
        launch.collective(lambda: dist.all_gather_object(parts, (self.query_index, mine)), what)
        pieces = sorted((q, p) for q, p in parts if p is not None and len(p))
        if not pieces:
            return part
        cat = torch.cat if torch.is_tensor(pieces[0][1]) else np.concatenate
        return cat([p for _, p in pieces], 0)

    def broadcast(self, obj, what: str = "broadcast from rank 0"):
        """``obj`` of rank 0 on every rank.

        Args:
            obj: any picklable object (only rank 0's is used).
            what: what is sent, for an error message.
        """
        if self.world == 1:
            return obj
        box = [obj]
        launch.collective(lambda: dist.broadcast_object_list(box, 0), what)
        return box[0]

    def load_state(self, path, fp):
        """:func:`patchmosaic.io.runstate.load_state` read by rank 0 and sent to every rank (its ValueError raised
        on every rank).

        Args:
            path: the state file (None: no state).
            fp: the run's fingerprint.

        Every rank's ``fp`` must be the same (a run whose ranks were given different seeds, labels, data, network or
        settings is refused on every rank, naming the ranks, before any work).
        """
        from ..io.runstate import load_state

        got = None
        if self.leader:
            try:
                got = ("ok", load_state(path, fp))
            except ValueError as e:
                got = ("error", str(e))
        if self.world == 1:
            every = [(fp, got)]
        else:
            every = [None] * self.world
            launch.collective(lambda: dist.all_gather_object(every, (fp, got)), "resume from the saved state")
        if any(f != every[0][0] for f, _ in every):
            groups = {}
            for r, (f, _) in enumerate(every):
                groups.setdefault(f, []).append(r)
            raise launch.RanksDisagree(
                "the ranks were given different runs (the fingerprint of the network, machine, seeds, labels and "
                "settings differs: " + "; ".join(f"{f} on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"
                                                 for f, rs in groups.items()) + "); every rank must run the same "
                "command on the same data")
        got = every[0][1]
        if got[0] == "error":
            raise ValueError(got[1])
        return got[1]

    def save_state(self, path, fp, **arrays) -> None:
        """:func:`patchmosaic.io.runstate.save_state` on rank 0 only.

        Args:
            path: the state file.
            fp: the run's fingerprint.
            arrays: the arrays to save.
        """
        from ..io.runstate import save_state

        if self.leader:
            save_state(path, fp, **arrays)

    def sample(self, sampler: Callable, denoiser, x1, labels=None, **kwargs):
        """``sampler(denoiser, x1, labels, **kwargs)`` (e.g. :func:`patchmosaic.ddim`) with the seeds spread over
        the query shards; the full result on every rank. With ``ddpm``, each shard draws its noise from
        ``generator`` as given, so the samples differ from one process's; every rank's generator must be in the
        same state (else refused on every rank, as different seeds are), and afterwards every rank's is reseeded
        from its state before the call (the shards drew different amounts), so the next call agrees too.

        Args:
            sampler: a sampler of :mod:`patchmosaic.sampling`.
            denoiser: its denoiser (a machine denoiser over this rank's :meth:`machine`).
            x1: all the seeds ``(M, C, H, W)``, the same on every rank.
            labels: their ``(M,)`` labels or None (default).
            kwargs: the sampler's other arguments.
        """
        gen = kwargs.get("generator")  # (ddpm's noise: every rank's generator in the same state)
        if self.world > 1:  # the seeds, labels and settings must be every rank's: else the gathered samples mix runs
            from ..io.runstate import fingerprint

            fp = fingerprint(x1=torch.as_tensor(np.asarray(x1) if not torch.is_tensor(x1) else x1),
                             labels=None if labels is None else np.asarray(torch.as_tensor(labels).cpu()),
                             generator=None if gen is None else gen.get_state(),
                             sampler=getattr(sampler, "__name__", str(sampler)),
                             settings={k: (np.asarray(v).tolist() if hasattr(v, "__len__") else v)
                                       for k, v in kwargs.items()
                                       if k not in ("progress", "generator") and not callable(v)})
            every = [None] * self.world
            launch.collective(lambda: dist.all_gather_object(every, fp), "agreement on the samples' seeds")
            if any(f != every[0] for f in every):
                groups = {}
                for r, f in enumerate(every):
                    groups.setdefault(f, []).append(r)
                raise launch.RanksDisagree(
                    "Layout.sample: the ranks were given different seeds, labels, generator states or sampler "
                    "settings ("
                    + "; ".join(f"{f} on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"
                                for f, rs in groups.items()) + "); every rank passes all the seeds")
        M = len(x1)
        sl = self.seeds(M)
        lab = labels
        if labels is not None and not isinstance(labels, (int, np.integer)):
            lab = labels[sl]
        before = None if gen is None or self.world == 1 else gen.get_state()
        part = sampler(denoiser, x1[sl], lab, **kwargs) if sl.stop > sl.start else None
        if before is not None:  # each shard drew its own amount: every rank's generator left in one state, a seed
            # drawn from its state before the call (so that the next call's agreement holds and draws anew)
            import hashlib

            digest = hashlib.sha256(b"Layout.sample" + before.cpu().numpy().tobytes()).digest()
            gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return self.gather(part, M, "gather of the samples")

