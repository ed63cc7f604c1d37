"""Bad input gets a ValueError / TypeError that names the problem, before any work starts."""

import numpy as np
import pytest
import torch

import patchmosaic as pm


@pytest.fixture
def train():
    return np.random.default_rng(0).uniform(-1, 1, (5, 1, 8, 8))


@pytest.fixture
def x():
    return np.random.default_rng(1).standard_normal((2, 1, 8, 8))


def test_images_rank_dtype_and_finiteness(train):
    with pytest.raises(ValueError, match=r"4 dimensions.*\(5, 8, 8\)"):
        pm.ELS(train[:, 0])
    with pytest.raises(TypeError, match="float32 or float64.*int64"):
        pm.ELS(train.astype(np.int64))
    bad = train.copy()
    bad[2, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pm.ELS(bad)
    with pytest.raises(ValueError, match="empty"):
        pm.ELS(train[:0])
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        pm.ELS(train.tolist())


def test_query_shape_channels_and_values(train, x):
    m = pm.ELS(train)
    with pytest.raises(ValueError, match="3 channels but the training images have 1"):
        m.denoise(np.zeros((1, 3, 8, 8)), 0.5, 3)
    with pytest.raises(ValueError, match="4 dimensions"):
        m.denoise(x[0], 0.5, 3)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        m.denoise(bad, 0.5, 3)
    with pytest.raises(TypeError, match="float16"):
        m.denoise(torch.zeros(1, 1, 8, 8, dtype=torch.float16), 0.5, 3)
    with pytest.raises(ValueError, match="training size 8x8, got 9x8"):
        pm.LS(train).denoise(np.zeros((1, 1, 9, 8)), 0.5, 3)
    with pytest.raises(ValueError, match="training size"):
        pm.IS(train).denoise(np.zeros((1, 1, 8, 9)), 0.5)


@pytest.mark.parametrize("k,err,msg", [(4, ValueError, "odd positive"), (0, ValueError, "odd positive"),
                                       (-3, ValueError, "odd positive"), (3.0, TypeError, "odd positive"),
                                       (None, ValueError, "pass a patch size"), (True, TypeError, "odd")])
def test_bad_k(train, x, k, err, msg):
    with pytest.raises(err, match=msg):
        pm.ELS(train).denoise(x, 0.5, k)


@pytest.mark.parametrize("t", [0.0, -0.1, 1.5, float("nan"), [0.5, 0.5, 0.5]])
def test_bad_t(train, x, t):
    with pytest.raises(ValueError, match=r"t must"):
        pm.ELS(train).denoise(x, t, 3)


def test_labels(train, x):
    with pytest.raises(ValueError, match="built without training labels"):
        pm.ELS(train).denoise(x, 0.5, 3, labels=[0, 1])
    m = pm.ELS(train, labels=[0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="label 7 has no training images"):
        m.denoise(x, 0.5, 3, labels=[0, 7])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        m.denoise(x, 0.5, 3, labels=[0, 1, 1])
    with pytest.raises(TypeError, match="integers"):
        m.denoise(x, 0.5, 3, labels=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        pm.ELS(train, labels=[0, 1])


def test_signature_without_training_patch(train):
    # a 20x20 canvas has interior rows (signature (0, 0)); with k = 9 no 8x8 training row has it
    with pytest.raises(ValueError, match="no training patch has the padding signature.*k=9"):
        pm.ELS(train).denoise(np.zeros((1, 1, 20, 20)), 0.5, 9)
    with pytest.raises(ValueError, match="no fully-inside patch"):
        pm.ELS(train, boundary="circular").denoise(np.zeros((1, 1, 8, 8)), 0.5, 9)


def test_memory_limit(train, x):
    with pytest.raises(pm.ResourceError, match="GiB of working memory"):
        pm.ELS(train, max_memory=1000).denoise(x, 0.5, 3)
    # a real out-of-memory request (a 2^40-pixel canvas batch) is refused from its size alone
    with pytest.raises(pm.ResourceError, match="more than the"):
        pm.ELS(train)._check_request_memory(torch.empty((1 << 16, 1, 1 << 12, 1 << 12), device="meta"), "cpu", False)


def test_backend_names(train, x):
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        pm.ELS(train, backend="gpu")
    with pytest.raises(ValueError, match="boundary must be"):
        pm.ELS(train, boundary="reflect")
    with pytest.raises(ValueError, match="unknown schedule"):
        pm.ELS(train, schedule="quadratic")


@pytest.mark.skipif(pm.cuda_available(), reason="the CUDA engine can run here")
def test_cuda_backend_unavailable_says_so(train, x):
    from patchmosaic import _core

    why = "torch sees no CUDA device" if _core.has_cuda else "no CUDA engine"
    with pytest.raises(RuntimeError, match=f"backend='cuda' is not available: .*{why}"):
        pm.ELS(train, backend="cuda").denoise(x, 0.5, 3)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        pm.IS(train).denoise(x, 0.5, backend="cuda")


def test_cuda_entry_points_check_their_index_arrays_before_touching_the_device():
    """A CUDA build (with or without a GPU): bad index arrays are refused on the host, before any
    device pointer is used (on a GPU an out-of-range index would kill the CUDA context)."""
    from patchmosaic import _core
    from patchmosaic.backends import Groups
    from patchmosaic.keysets import boundary_keyset

    if not _core.has_cuda:
        pytest.skip("this build has no CUDA engine")
    ks = boundary_keyset(6, 6, 6, 6, 3)
    g = Groups(np.array([0, 4], np.int64), np.arange(4, dtype=np.int32), np.zeros(2, np.int32))
    a = np.ones(2)

    def call(k=3, grp_img=g.grp_img, group_of_b=g.group_of_b, cls_kpos=ks.cls_kpos):
        _core.patch_softmax_cuda(False, 0, [4, 1, 6, 6], 0, [2, 1, 6, 6], k, ks.query_pad, ks.key_pad, a, a,
                                 ks.cls_qpix_ptr, ks.cls_qpix, ks.cls_kpos_ptr, cls_kpos, g.grp_img_ptr, grp_img,
                                 group_of_b, 0, 0, 0, 0, 0)

    with pytest.raises(ValueError, match="k must be odd"):
        call(k=4)
    with pytest.raises(ValueError, match="grp_img holds an index outside"):
        call(grp_img=np.array([0, 1, 2, 9], np.int32))
    with pytest.raises(ValueError, match="group_of_b holds an index outside"):
        call(group_of_b=np.array([0, 3], np.int32))
    with pytest.raises(ValueError, match="cls_kpos holds an index outside"):
        call(cls_kpos=ks.cls_kpos + 100)
    with pytest.raises(ValueError, match="group_of_b holds an index outside"):
        _core.ideal_score_cuda(False, 0, [4, 36], 0, [2, 36], a, a, g.grp_img_ptr, g.grp_img,
                               np.array([0, 5], np.int32), 0, 0, 0, 0, 0)
