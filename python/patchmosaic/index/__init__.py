"""patchmosaic.index: approximate local machines through a FAISS patch index, with a stated error bound.

- patch_index.py: :class:`PatchIndex`, the index of one machine at one patch size (build, parts, FAISS)
- query.py: retrieve, re-score exactly (the ``candidate_softmax`` op), bound (:class:`ApproxResult`)
- bound.py: the error bound; retrieval_check.py: the check of an IVF bound's retrieval condition; store.py: save / load with a manifest; recall.py: measured recall
- cache.py: indexes cached per machine (:func:`cached_index`, :func:`approx_denoise`)
"""

from .bound import error_bound
from .cache import approx_denoise, cached_index
from .patch_index import KINDS, Part, PatchIndex
from .query import ApproxResult
from .recall import exact_topm_ids, measure_recall
from .retrieval_check import RetrievalWarning, check_retrieval
from .vectors import key_vectors, patch_vectors, row_hashes

__all__ = ["PatchIndex", "Part", "ApproxResult", "KINDS", "error_bound", "cached_index", "approx_denoise",
           "measure_recall", "RetrievalWarning", "check_retrieval", "exact_topm_ids", "key_vectors", "patch_vectors", "row_hashes"]
