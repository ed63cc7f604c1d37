"""patchmosaic.ops: the machines' operations as PyTorch custom ops, and the only door to the compiled core.

Everything that touches ``patchmosaic._core`` is in this package: the call structs (contract.py), the two
compiled engines (engines.py), the torch reference (reference.py), the key-set tables that drive them
(tables.py; the machines build them), class conditioning (labels.py) and the custom ops themselves (library.py),
registered as ``torch.ops.patchmosaic.local_softmax``, ``ideal_softmax``, ``aligned_softmax`` (aligned.py: the
same-position machines), their ``*_backward`` and ``candidate_softmax``; and the partial softmax state they share
with the patch index and the distributed merge (state.py).
"""

from .engines import (CUDA_MAX_CHANNELS, CUDA_MAX_K, cpu_variant, cpu_variants, cuda_available, cuda_built,
                      max_threads, use_cpu_variant)
from .tables import CIRCULAR, MAX_MULTI_K, ZEROS, ElementTable, KeySet, MultiKeySet, csr_keyset
from .state import SoftmaxState
from .masks import gaussian_mask
from .labels import Groups, LabelIndex, groups
from .library import (BACKENDS, candidate_softmax, ideal_softmax, ideal_softmax_backward, local_softmax,
                      local_softmax_backward, local_softmax_ks, seeded_draws, seeded_normal)
from .wiener_mask import wiener_mask_max, wiener_mask_rows, wiener_masks
from .expansion_means import expansion_means
from .aligned import (aligned_softmax, aligned_softmax_backward, composite, dense_table, patch_table,
                      element_weights, response_count, window_table, window_table_log_response)

__all__ = ["wiener_masks", "wiener_mask_max", "wiener_mask_rows", "expansion_means",
           "aligned_softmax", "aligned_softmax_backward", "composite", "dense_table", "patch_table",
           "window_table", "response_count", "element_weights", "window_table_log_response", "gaussian_mask", "ElementTable", "SoftmaxState", "local_softmax",
           "local_softmax_ks", "MultiKeySet", "local_softmax_backward", "ideal_softmax", "ideal_softmax_backward",
           "candidate_softmax", "KeySet", "csr_keyset", "MAX_MULTI_K", "ZEROS", "CIRCULAR", "LabelIndex", "Groups",
           "groups", "BACKENDS", "seeded_draws", "seeded_normal",
           "cuda_available", "cuda_built", "max_threads", "cpu_variant", "cpu_variants", "use_cpu_variant", "CUDA_MAX_CHANNELS", "CUDA_MAX_K"]
