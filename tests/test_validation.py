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
        pm.ELS(train).check_request((1 << 16, 1, 1 << 12, 1 << 12), torch.float32, "cpu")


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


@pytest.mark.parametrize("entry", ["local_forward_cpu", "local_backward_cpu", "local_forward_cuda"])
def test_entry_points_check_their_call_structs_before_touching_a_buffer(entry):
    """Both engines validate the call struct on the host, index arrays included, before any buffer is
    used (on a GPU an out-of-range index would kill the CUDA context; on the CPU it would crash)."""
    from patchmosaic import _core
    from patchmosaic.machines.keysets import keyset
    from patchmosaic.ops import contract
    from patchmosaic.ops.labels import Groups

    if entry.endswith("cuda") and not _core.has_cuda:
        pytest.skip("this build has no CUDA engine")
    ks = keyset("els_zeros", 6, 6, 6, 6, 3)
    g = Groups(np.array([0, 4], np.int64), np.arange(4, dtype=np.int32), np.zeros(2, np.int32))
    train, query = torch.zeros(4, 1, 6, 6), torch.zeros(2, 1, 6, 6)
    a = torch.ones(2, dtype=torch.float64)
    out, stats = torch.zeros(2, 1, 6, 6), torch.zeros(2, 6, 6, 2, dtype=torch.float64)
    run = getattr(_core, entry)

    def call(**change):
        c = contract.local_call(_core, train=train, query=query, k=3, keyset=ks, a=a, inv_2b2=a, groups=g, out=out,
                                stats=stats, grad_out=out, grad_query=out, grad_a=a, grad_inv_2b2=a)
        for name, value in change.items():
            setattr(c, name, value if isinstance(value, int) else contract.address(value))
        return run(c, 0, 0) if entry.endswith("cuda") else run(c)

    bad_img = np.array([0, 1, 2, 9], np.int32)
    bad_group = np.array([0, 3], np.int32)
    bad_kpos = ks.cls_kpos + 100
    bad_qpix = ks.cls_qpix + 100
    with pytest.raises(ValueError, match="patch size k must be odd"):
        call(k=4)
    with pytest.raises(ValueError, match="grp_img holds an index outside"):
        call(grp_img=bad_img)
    with pytest.raises(ValueError, match="group_of_b holds an index outside"):
        call(group_of_b=bad_group)
    with pytest.raises(ValueError, match="cls_kpos holds an index outside"):
        call(cls_kpos=bad_kpos)
    with pytest.raises(ValueError, match="cls_qpix holds an index outside"):
        call(cls_qpix=bad_qpix)
    with pytest.raises(ValueError, match="offsets must run from 0"):
        call(n_cls_qpix=3)
    with pytest.raises(ValueError, match="dtype must be"):
        call(dtype=7)
    with pytest.raises(ValueError, match="train is missing"):
        call(train=0)
    with pytest.raises(ValueError, match="the query batch is too large"):
        call(B=1 << 40, Hq=1 << 30, Wq=1 << 30)
    with pytest.raises(AttributeError):
        setattr(_core.LocalCall(), "no_such_field", 1)
    with pytest.raises(RuntimeError, match="missing fields"):
        contract.make(_core.LocalCall, dtype=0)
