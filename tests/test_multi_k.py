"""Several patch sizes in one pass (Machine.denoise_ks, ops.local_softmax_ks): the same function as one call per
size, for every local machine, both dtypes, labels, larger canvases, dense and sparse size lists; bad size lists
refused before any work."""

import numpy as np
import pytest
import torch


import patchmosaic as pm
from patchmosaic import ops
from patchmosaic.machines import keysets
from patchmosaic.experiments.calibrate import calibrate
from patchmosaic.ops import engines
from triton_cases import DEVICE, TRITON

RANGE = 2.0  # the data range: images in [-1, 1]
N, C, H, W = 10, 3, 9, 8


def _data():
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, (N, C, H, W)).astype(np.float32)
    labels = np.arange(N) % 3
    return images, labels


def _machine(rule, images, labels):
    if rule == "ls":
        return pm.LS(images, labels)
    if rule == "els_zeros":
        return pm.ELS(images, labels)
    return pm.ELS(images, labels, boundary="circular", wrapped=rule == "els_wrapped")


# (rule, canvas, size lists): canvases larger than the training images where the machine allows them
CASES = [
    ("ls", (H, W), [[1, 3, 5, 7, 9], [3, 9, 15]]),
    ("els_zeros", (12, 11), [[1, 3, 5, 7], [3, 7]]),  # k = 9 has a column signature no 8-wide image has
    ("els_zeros", (H, W), [[1, 3, 5, 7, 9], [3, 9, 15]]),
    ("els_circular", (11, 10), [[1, 3, 5, 7], [3, 7]]),
    ("els_wrapped", (10, 12), [[1, 3, 5, 7, 9], [3, 9, 15]]),
]


def _check(out, ref, dtype, what):
    err = (out.double() - ref.double()).abs()
    if dtype == torch.float32:
        assert float(err.mean()) <= 1e-5 * RANGE, f"{what}: mean error {float(err.mean()):.3g}"
        assert float(err.max()) <= 1e-3 * RANGE, f"{what}: worst error {float(err.max()):.3g}"
    else:
        assert float(err.max()) <= 1e-9 * RANGE, f"{what}: worst error {float(err.max()):.3g}"


def _inputs(rule, canvas, dtype, conditional):
    images, labels = _data()
    m = _machine(rule, images, labels)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, C, *canvas, generator=g, dtype=torch.float64).to(dtype)
    lab = torch.tensor([0, 2, 1]) if conditional else None
    t = torch.tensor([0.15, 0.5, 0.9], dtype=torch.float64)  # one time per image, small to large noise
    return m, x, lab, t


def _one_pass(m, x, t, lab, eff):
    """The CPU engine's one pass itself at the sizes eff (whatever denoise_ks chooses for the rule)."""
    lv, lp, li = m.label_index.tensors()
    a, s, _ = m.coefficients(t, len(t))
    return ops.local_softmax_ks(m.train_as(x.dtype, torch.device("cpu")), x, a, s, t, lab, lv, lp, li,
                                m.multi_keyset(x.shape[2], x.shape[3], eff), "cpu")


@pytest.fixture
def one_torch_thread():
    """The torch oracle single-threaded: its many small ops spend most of their time in thread hand-offs on a
    shared machine (about 15x slower with two threads under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("rule,canvas,lists", CASES, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "labels"])
def test_one_pass_equals_separate_calls(rule, canvas, lists, dtype, conditional):
    """denoise_ks and the engine's one pass against one float64 CPU call per size (the separate calls are checked
    against the float64 oracle in test_exactness, and the one pass directly in the next test)."""
    m, x, lab, t = _inputs(rule, canvas, dtype, conditional)
    for ks in lists:
        out = m.denoise_ks(x, t, ks, labels=lab)
        assert out.shape == (len(ks), *x.shape) and out.dtype == dtype
        eff = sorted({m.effective_k(k, *canvas) for k in ks})
        one = _one_pass(m, x, t, lab, eff)
        for j, k in enumerate(ks):
            ref = m.denoise(x.double(), t, k, labels=lab, backend="cpu")
            _check(one[eff.index(m.effective_k(k, *canvas))], ref, dtype, f"{rule} k={k} one pass vs separate call")
            _check(out[j], ref, dtype, f"{rule} k={k} denoise_ks vs separate call")


@pytest.mark.parametrize("rule,canvas,lists", CASES, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}" for c in CASES])
def test_one_pass_equals_the_float64_oracle(rule, canvas, lists, one_torch_thread):
    """One comparison with the torch oracle per machine and canvas: every size of the first list, float64, with
    labels, both denoise_ks and the engine's one pass."""
    m, x, lab, t = _inputs(rule, canvas, torch.float64, True)
    ks = lists[0]
    out = m.denoise_ks(x, t, ks, labels=lab)
    one = _one_pass(m, x, t, lab, ks)
    # the sweep on the torch engine: one oracle call per size, through each size's class maps from the multi-size
    # table (boundary-aware ELS's were once refused: "share some but not all key positions")
    swept = m.denoise_ks(x, t, ks, labels=lab, backend="torch")
    for j, k in enumerate(ks):
        oracle = m.denoise(x, t, k, labels=lab, backend="torch")
        _check(one[j], oracle, torch.float64, f"{rule} k={k} one pass vs float64 oracle")
        _check(out[j], oracle, torch.float64, f"{rule} k={k} denoise_ks vs float64 oracle")
        _check(swept[j], oracle, torch.float64, f"{rule} k={k} torch sweep vs float64 oracle")


SWEEP_CASES = [("ls", (H, W), [1, 3]), ("els_zeros", (12, 11), [3, 7]), ("els_zeros", (H, W), [1, 3]),
               ("els_circular", (11, 10), [3, 7]), ("els_wrapped", (10, 12), [3, 9, 15])]


@pytest.mark.parametrize("rule,canvas,ks", SWEEP_CASES, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}" for c in SWEEP_CASES])
@pytest.mark.parametrize("backend", [TRITON])
def test_sweep_on_the_triton_engine_equals_separate_calls(rule, canvas, ks, backend):
    """denoise_ks on the Triton engine (float32, labels; one pass of its single-size kernel per size) against one
    float64 CPU call per size, on shorter size lists than the CPU engine's (the interpreter is slow; LS and small
    canvases with many padding signatures launch a program per pixel class)."""
    m, x, lab, t = _inputs(rule, canvas, torch.float32, True)
    out = m.denoise_ks(x.to(DEVICE), t, ks, labels=lab, backend=backend)
    assert out.shape == (len(ks), *x.shape) and out.dtype == torch.float32 and out.device.type == DEVICE.type
    for j, k in enumerate(ks):
        ref = m.denoise(x.double(), t, k, labels=lab, backend="cpu")
        _check(out[j].cpu(), ref, torch.float32, f"{rule} k={k} Triton sweep vs separate call")


@pytest.mark.parametrize("rule,canvas,lists", CASES, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}" for c in CASES])
def test_size_masks_recover_each_sizes_key_set(rule, canvas, lists):
    for ks in lists:
        ks = tuple(k for k in ks if rule != "els_circular" or k <= min(H, W))
        multi = keysets.multi_keyset(rule, *canvas, H, W, ks)
        for j, k in enumerate(ks):
            want = keysets.keyset(rule, *canvas, H, W, k)
            got = multi.size_keyset(j)
            key_of = {}
            for q, kp in want.classes():
                for p in q:
                    key_of[int(p)] = set(kp.tolist())
            for q, kp in got.classes():
                for p in q:
                    assert set(kp.tolist()) == key_of.pop(int(p)), f"{rule} k={k} pixel {p}"
            assert not key_of
            # as class maps (what the torch engine takes): each query pixel's class holds its key positions
            qc, kc, _, _ = got.class_maps(torch.empty(1, 1, *canvas), torch.empty(1, 1, H, W))
            for q, kp in want.classes():
                for p in q:
                    assert set(np.nonzero(kc.numpy() == int(qc[p]))[0].tolist()) == set(kp.tolist()), (rule, k, p)


def test_numpy_in_numpy_out_and_sizes_past_the_padding_limit():
    images, labels = _data()
    m = pm.ELS(images)
    x = np.random.default_rng(1).standard_normal((2, C, H, W)).astype(np.float32)
    out = m.denoise_ks(x, 0.4, [3, 17, 41])  # 41 > 2 max(H, W) - 1 = 17: computed as 17, exactly
    assert isinstance(out, np.ndarray) and out.shape == (3, 2, C, H, W)
    np.testing.assert_array_equal(out[1], out[2])
    np.testing.assert_allclose(out[0], m.denoise(x, 0.4, 3), atol=2e-5)


def test_bad_size_lists_are_refused_before_any_work():
    images, labels = _data()
    m = pm.ELS(images, labels)
    x = torch.zeros(1, C, H, W)
    for ks, words in [([], "empty"), ([3, 4], "odd"), ([5, 3], "strictly increasing"),
                      ([3, 3, 5], "strictly increasing"), ([0, 3], "odd")]:
        with pytest.raises(ValueError, match=words):
            m.denoise_ks(x, 0.5, ks)
    with pytest.raises(TypeError, match="ks must be a sequence of odd patch sizes, got 3"):
        m.denoise_ks(x, 0.5, 3)
    with pytest.raises(TypeError, match="patch size k must be an odd positive integer, got 3.0"):
        m.denoise_ks(x, 0.5, [3.0, 5])
    with pytest.raises(ValueError, match="IS machine"):
        pm.IS(images).denoise_ks(x, 0.5, [3])
    with pytest.raises(ValueError, match="exceeds the training images"):
        pm.ELS(images, boundary="circular").denoise_ks(x, 0.5, [3, 11])
    with pytest.raises(ValueError, match="NaN"):
        m.denoise_ks(torch.full((1, C, H, W), float("nan")), 0.5, [3, 5])
    with pytest.raises(ValueError, match="label 7"):
        m.denoise_ks(x, 0.5, [3, 5], labels=[7])
    # the op refuses a table the machine would not have built
    lv, lp, li = m.label_index.tensors()
    a, s, _ = m.coefficients(0.5, 1)
    multi = m.multi_keyset(H, W, (3, 5))
    with pytest.raises(ValueError, match="strictly increasing"):
        ops.local_softmax_ks(m.images, x, a, s, None, None, lv, lp, li, ops.MultiKeySet((5, 3), multi.keyset,
                                                                                         multi.kmask))
    with pytest.raises(ValueError, match="at most 32"):
        ops.local_softmax_ks(m.images, x, a, s, None, None, lv, lp, li,
                             ops.MultiKeySet(tuple(range(1, 67, 2)), multi.keyset, multi.kmask))
    with pytest.raises(ValueError, match="one size mask per key position"):
        ops.local_softmax_ks(m.images, x, a, s, None, None, lv, lp, li,
                             ops.MultiKeySet((3, 5), multi.keyset, multi.kmask[:-1]))
    with pytest.raises(ValueError, match="multi_keyset sweeps patch sizes|has no key set"):
        pm.IS(images).multi_keyset(H, W, (3,))


def _multi_call_parts():
    """What a multi-size call struct is built from in the compiled-core checks below: the training images, one
    query, the key sets of sizes 3 and 5, the groups, the coefficient tensor and the output."""
    from patchmosaic.ops.labels import groups

    images, _ = _data()
    return (images, torch.zeros(1, C, H, W), keysets.multi_keyset("els_zeros", H, W, H, W, (3, 5)),
            groups(None, None, None, None, N, 1), torch.ones(1, dtype=torch.float64), torch.empty(2, 1, C, H, W))


def test_the_compiled_core_checks_the_call():
    from patchmosaic.ops import contract, engines

    images, x, multi, grp, a, out = _multi_call_parts()
    bad = ops.MultiKeySet((5, 3), multi.keyset, multi.kmask)
    call, keep = contract.local_multi_call(engines._CPU_MODULE, train=torch.from_numpy(images), query=x, multi=bad,
                                           a=a, inv_2b2=a, groups=grp, out=out)
    with pytest.raises(ValueError, match="strictly increasing"):
        engines._CPU_MODULE.local_forward_multi_cpu(call)
    bad = ops.MultiKeySet((3, 5), multi.keyset, multi.kmask | np.uint32(4))
    call, keep = contract.local_multi_call(engines._CPU_MODULE, train=torch.from_numpy(images), query=x, multi=bad,
                                           a=a, inv_2b2=a, groups=grp, out=out)
    with pytest.raises(ValueError, match="beyond n_ks"):
        engines._CPU_MODULE.local_forward_multi_cpu(call)


class _MachineNet(torch.nn.Module):
    def __init__(self, machine, ks):
        super().__init__()
        self.machine, self.ks = machine, ks

    def forward(self, t, x, labels=None):
        t0 = float(t[0])
        return self.machine.eps(x, t0, self.ks.k_at(t0), labels=labels)


@pytest.mark.parametrize("kind", ["els", "ls"])
def test_calibration_with_one_pass_equals_one_call_per_size(kind, monkeypatch):
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (24, 1, 10, 10)).astype(np.float32)
    labels = np.arange(24) % 3
    m = pm.ELS(train, labels) if kind == "els" else pm.LS(train, labels)
    true = pm.KSchedule((1.0, 0.8, 0.6, 0.4, 0.2), (9, 7, 7, 5, 3))
    x1 = torch.randn(4, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    cands = (11, 3, 7, 5, 9)  # any order: calibrate sorts them for the pass
    one = calibrate(_MachineNet(m, true), m, x1, y, candidates=cands, steps=5, progress=False)

    def per_size(x, t, ks, labels=None, backend=None):
        return torch.stack([m.denoise(x, t, k, labels=labels) for k in ks])

    monkeypatch.setattr(m, "denoise_ks", per_size)
    sep = calibrate(_MachineNet(m, true), m, x1, y, candidates=cands, steps=5, progress=False)
    assert one.schedule == sep.schedule
    assert (one.choices == sep.choices).all()
    np.testing.assert_allclose(one.cosine, sep.cosine, atol=1e-5)
    if kind == "els":
        assert one.schedule == true


# ------------------------------------------------------------------------------------------------ CUDA engine
from cuda_emulation import dev, needs_gpu  # noqa: E402,F401  (the CUDA-or-emulator fixture)




@pytest.fixture
def one_pass_calls(monkeypatch):
    """Counts the compiled one-pass calls per engine (so a test sees the one pass ran, not one call per size)."""
    calls = []
    inner = engines.local_forward_multi

    def spy(engine, *args, **kw):
        calls.append(engine.name)
        return inner(engine, *args, **kw)

    monkeypatch.setattr(engines, "local_forward_multi", spy)
    return calls


@pytest.mark.parametrize("rule,canvas,lists", CASES, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "labels"])
def test_cuda_one_pass_equals_separate_float64_cpu_calls(rule, canvas, lists, dtype, conditional, dev, one_pass_calls):
    """The CUDA engine's one pass (denoise_ks with backend='cuda') against one float64 CPU call per size, every
    local machine, with and without labels: float32 to 1e-5 (mean) and 1e-3 (max) of the data range, float64 to
    1e-9."""
    m, x, lab, t = _inputs(rule, canvas, torch.float64, conditional)
    images, labels = _data()
    g = _machine(rule, torch.from_numpy(images).to(device=dev, dtype=dtype), labels)
    xd = x.to(device=dev, dtype=dtype)
    labd = None if lab is None else lab.to(dev)
    for ks in lists:
        out = g.denoise_ks(xd, t.to(dev), ks, labels=labd, backend="cuda")
        assert out.shape == (len(ks), *x.shape) and out.dtype == dtype and out.device.type == dev.type
        for j, k in enumerate(ks):
            ref = m.denoise(x, t, k, labels=lab, backend="cpu")
            _check(out[j].cpu(), ref, dtype, f"{rule} k={k} CUDA one pass vs separate float64 CPU call")
    assert one_pass_calls == ["cuda"] * len(lists)


def test_cuda_one_pass_equals_the_float64_oracle(dev, one_torch_thread):
    """One direct comparison of the CUDA engine's op with the torch oracle: boundary-aware ELS on a larger canvas
    (border classes at each size, the interior in one pass), float64, with labels."""
    rule, canvas, lists = CASES[1]
    m, x, lab, t = _inputs(rule, canvas, torch.float64, True)
    images, labels = _data()
    g = _machine(rule, torch.from_numpy(images).double().to(dev), labels)
    lv, lp, li = g.label_index.tensors()
    a, s, _ = g.coefficients(t, len(t))
    ks = lists[0]
    one = ops.local_softmax_ks(g.train_as(torch.float64, dev), x.to(dev), a.to(dev), s.to(dev), t.to(dev),
                               lab.to(dev), lv, lp, li, g.multi_keyset(*canvas, ks), "cuda")
    for j, k in enumerate(ks):
        _check(one[j].cpu(), m.denoise(x, t, k, labels=lab, backend="torch"), torch.float64,
               f"{rule} k={k} CUDA one pass vs float64 oracle")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cuda_query_patches_resident_or_gathered_per_key(dtype, dev, monkeypatch):
    """Each thread's query patch is kept in shared memory when the block's patches fit the budget
    (PATCHMOSAIC_CUDA_QUERY_SMEM_KB, default 48; 64 patches of C k^2 = 75 float32 elements at k = 5 do, and of
    27 float64 elements at k = 3) and gathered again for every key otherwise (budget 0): the same sums in the same
    order, so the same bits."""
    images, labels = _data()
    m = pm.ELS(torch.from_numpy(images).to(device=dev, dtype=dtype), labels)
    x = torch.randn(2, C, 10, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dev, dtype)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64, device=dev)
    lab = torch.tensor([1, 0], device=dev)
    ks = [1, 3, 5] if dtype == torch.float32 else [1, 3]
    got = m.denoise_ks(x, t, ks, labels=lab, backend="cuda")
    monkeypatch.setenv("PATCHMOSAIC_CUDA_QUERY_SMEM_KB", "0")
    assert torch.equal(m.denoise_ks(x, t, ks, labels=lab, backend="cuda"), got)
    ref = pm.ELS(images, labels).denoise_ks(x.cpu().double(), t.cpu(), ks, labels=lab.cpu(), backend="cpu")
    _check(got.cpu(), ref, dtype, "CUDA one pass vs CPU one pass")


def test_the_compiled_cuda_entry_checks_the_call(dev):
    """The CUDA entry validates its struct on the host (the CPU entry's checks, and the CUDA engine's limits)."""
    mod = engines.CUDA.module
    from patchmosaic.ops import contract

    images, x, multi, grp, a, out = _multi_call_parts()
    bad = ops.MultiKeySet((5, 3), multi.keyset, multi.kmask)
    call, keep = contract.local_multi_call(mod, train=torch.from_numpy(images), query=x, multi=bad, a=a, inv_2b2=a,
                                           groups=grp, out=out)
    with pytest.raises(ValueError, match="strictly increasing"):
        mod.local_forward_multi_cuda(call, 0, 0)
    wide = torch.zeros(1, 5, H, W)
    call, keep = contract.local_multi_call(mod, train=torch.zeros(N, 5, H, W), query=wide, multi=multi, a=a,
                                           inv_2b2=a, groups=grp, out=torch.empty(2, 1, 5, H, W))
    with pytest.raises(ValueError, match="1 to 4 channels"):
        mod.local_forward_multi_cuda(call, 0, 0)
