"""patchmosaic.ops: the machines' operations as PyTorch custom ops, and the only door to the compiled core.

Everything that touches ``patchmosaic._core`` is in this package: the call structs (contract.py), the two
compiled engines (engines.py), the torch reference (reference.py), the key sets that drive them
(keysets.py), class conditioning (labels.py) and the custom ops themselves (library.py), registered as
``torch.ops.patchmosaic.local_softmax``, ``ideal_softmax``, their ``*_backward`` and ``candidate_softmax``.
"""

from .engines import (CUDA_MAX_CHANNELS, CUDA_MAX_K, cpu_variant, cpu_variants, cuda_available, cuda_built,
                      max_threads, use_cpu_variant)
from .keysets import CIRCULAR, RULES, ZEROS, KeySet, MultiKeySet, keyset, multi_keyset
from .labels import Groups, LabelIndex, groups
from .library import (BACKENDS, candidate_softmax, ideal_softmax, ideal_softmax_backward, local_softmax,
                      local_softmax_backward, local_softmax_ks)

__all__ = ["local_softmax", "local_softmax_ks", "multi_keyset", "MultiKeySet", "local_softmax_backward", "ideal_softmax", "ideal_softmax_backward", "candidate_softmax",
           "keyset", "KeySet", "RULES", "ZEROS", "CIRCULAR", "LabelIndex", "Groups", "groups", "BACKENDS",
           "cuda_available", "cuda_built", "max_threads", "cpu_variant", "cpu_variants", "use_cpu_variant", "CUDA_MAX_CHANNELS", "CUDA_MAX_K"]
