"""The same-position engine (ops.aligned_softmax; cpu/aligned_softmax.cpp, cuda/aligned_softmax.cu and the dense
torch reference): every engine against a literal float64 loop over rows and training images, on random element
tables (neighbourhoods anywhere in the image, across channels, weighted or not; responses of one or several
elements), with labels; gradients; the table constructors; bad tables refused before any work.

Tolerances: float64 engines within 1e-9 of the loop (max abs), float32 within 1e-5 of the data range on average
and 1e-3 at worst (the project's float32 contract)."""

import numpy as np
import pytest
import torch

from patchmosaic import ops
from patchmosaic.ops.tables import ElementTable

from cuda_emulation import dev  # noqa: F401  (the CUDA-or-emulator fixture)

C, H, W, N, B = 2, 5, 4, 40, 3
D = C * H * W


def random_table(rng, weighted: bool, n_rows: int = 11) -> ElementTable:
    hp, he, hw, rp, re = [0], [], [], [0], []
    for row in range(n_rows):
        size = 0 if row == 2 else int(rng.integers(1, 12))  # row 2: an empty neighbourhood (the images' mean)
        els = np.sort(rng.choice(D, size=size, replace=False))
        he += els.tolist()
        hw += (rng.uniform(0.2, 3.0, len(els)) if weighted else np.ones(len(els))).tolist()
        hp.append(len(he))
        re += rng.choice(D, size=int(rng.integers(1, 4)), replace=False).tolist()
        rp.append(len(re))
    return ElementTable(np.array(hp, np.int64), np.array(he, np.int32), np.array(hw) if weighted else None,
                        np.array(rp, np.int64), np.array(re, np.int32))


def literal(train, x, a, inv, table, groups):
    """out (B, n_resp), m and s (B, n_rows), the first image with the largest logit: loops, float64 numpy."""
    out = np.zeros((len(x), len(table.resp_elem)))
    m, s, best = (np.zeros((len(x), table.n_rows)) for _ in range(3))
    for b in range(len(x)):
        for r in range(table.n_rows):
            els = table.hood_elem[table.hood_ptr[r]:table.hood_ptr[r + 1]]
            w = np.ones(len(els)) if table.hood_weight is None else table.hood_weight[table.hood_ptr[r]:table.hood_ptr[r + 1]]
            resp = table.resp_elem[table.resp_ptr[r]:table.resp_ptr[r + 1]]
            logits = np.array([-inv[b] * np.sum(w * (x[b, els] - a[b] * train[n, els]) ** 2) for n in groups[b]])
            e = np.exp(logits - logits.max())
            out[b, table.resp_ptr[r]:table.resp_ptr[r + 1]] = (e[:, None] * train[groups[b]][:, resp]).sum(0) / e.sum()
            m[b, r], s[b, r], best[b, r] = logits.max(), e.sum(), groups[b][int(np.argmax(logits))]
    return out, m, s, best


def _case(seed, weighted, t=(0.4, 0.1, 0.8)):
    rng = np.random.default_rng(seed)
    train = rng.uniform(-1, 1, (N, D))
    labels = rng.integers(0, 3, N)
    qlab = np.array([0, 2, 0])
    x = np.stack([0.7 * train[rng.integers(N)] + 0.5 * rng.standard_normal(D) for _ in range(B)])
    alpha_bar = np.cos(np.asarray(t) / 1.008 * np.pi / 2) ** 2
    a, inv = np.sqrt(alpha_bar), 0.5 / (1 - alpha_bar)
    index = ops.LabelIndex.from_labels(labels)
    return train, x, a, inv, labels, qlab, index, random_table(rng, weighted)


def _call(train, x, a, inv, qlab, index, table, dtype, backend, provenance=True, device="cpu"):
    T = lambda v: torch.as_tensor(v).to(device)
    return ops.aligned_softmax(T(train.reshape(N, C, H, W)).to(dtype), T(x.reshape(B, C, H, W)).to(dtype), T(a), T(inv),
                               None, torch.as_tensor(qlab), *index.tensors(), *table.tensors(), provenance, backend, 0, 0)


def _check(got, want, dtype, what):
    err = np.abs(got - want)
    if dtype == torch.float64:
        assert err.max() <= 1e-9, f"{what}: float64 error {err.max():.3g}"
    else:
        assert err.mean() <= 1e-5 * 2 and err.max() <= 1e-3 * 2, f"{what}: float32 error {err.mean():.3g} / {err.max():.3g}"


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_engines_equal_the_literal_loop(backend, dtype, weighted):
    train, x, a, inv, labels, qlab, index, table = _case(1, weighted)
    groups = [np.nonzero(labels == q)[0] for q in qlab]
    out, m, s, best = literal(train, x, a, inv, table, groups)
    got, stats, key, share = _call(train, x, a, inv, qlab, index, table, dtype, backend)
    _check(got.double().numpy(), out, dtype, f"{backend} out")  # values in [-1, 1]: range 2
    assert np.allclose(stats[..., 0].numpy(), m, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)
    assert np.allclose(stats[..., 1].numpy(), s, rtol=1e-5 if dtype == torch.float32 else 1e-10)
    assert np.array_equal(key.numpy(), best)
    assert np.allclose(share.double().numpy(), 1 / s, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cuda_engine_equals_the_literal_loop(dev, dtype):  # noqa: F811
    train, x, a, inv, labels, qlab, index, table = _case(2, True)
    groups = [np.nonzero(labels == q)[0] for q in qlab]
    out, m, s, best = literal(train, x, a, inv, table, groups)
    got, stats, key, share = _call(train, x, a, inv, qlab, index, table, dtype, "cuda", device=dev)
    _check(got.double().cpu().numpy(), out, dtype, "cuda out")
    assert np.allclose(stats[..., 1].cpu().numpy(), s, rtol=1e-5)
    assert np.array_equal(key.cpu().numpy(), best)


def test_many_images_in_parts_and_response_sums_outside_registers(dev):  # noqa: F811
    """More images than one part holds (several parts merged, CPU and CUDA; the same bits for any number of CPU
    threads), rows with more responses than the CUDA kernel keeps in registers."""
    rng = np.random.default_rng(3)
    n = 700
    train = rng.uniform(-1, 1, (n, D))
    x = 0.6 * train[:B] + 0.6 * rng.standard_normal((B, D))
    a, inv = np.full(B, 0.6), np.full(B, 1.2)
    table = random_table(rng, True, 5)
    table = ElementTable(table.hood_ptr, table.hood_elem, table.hood_weight, np.arange(6, dtype=np.int64) * 6,
                         np.concatenate([rng.choice(D, 6, replace=False) for _ in range(5)]).astype(np.int32))
    index = ops.LabelIndex.from_labels(None)
    out, _, _, _ = literal(train, x, a, inv, table, [np.arange(n)] * B)
    T = torch.as_tensor
    for backend, device in (("cpu", "cpu"), ("cuda", dev)):
        got = ops.aligned_softmax(T(train.reshape(n, C, H, W)).to(device), T(x.reshape(B, C, H, W)).to(device),
                                  T(a).to(device), T(inv).to(device), None, None, *index.tensors(), *table.tensors(),
                                  False, backend, 1 if backend == "cpu" else 0, 0)[0]
        assert np.abs(got.cpu().numpy() - out).max() <= 1e-9, backend
    one, two = (ops.aligned_softmax(T(train.reshape(n, C, H, W)), T(x.reshape(B, C, H, W)), T(a), T(inv), None, None,
                                    *index.tensors(), *table.tensors(), True, "cpu", nt, 0) for nt in (1, 2))
    assert all(torch.equal(u, v) for u, v in zip(one, two))  # the same parts whatever the number of threads


@pytest.mark.parametrize("order", ["closer", "farther"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_maximum_rising_past_the_cut_and_blocks_below_it(order, dtype):
    """The CPU engine's per-lane sums across a part: images ordered so that each block is much closer to the query
    than the last ("closer": the row's maximum rises by far more than the cut within a part, so the lanes' earlier
    sums are rescaled to exactly 0) or much farther ("farther": whole blocks below the cut, skipped), 601 images (two
    parts, a short last block), against the literal loop."""
    rng = np.random.default_rng(7)
    n = 601
    x = rng.uniform(-1, 1, (1, D))
    spread = np.geomspace(3.0, 0.01, n) if order == "closer" else np.geomspace(0.01, 3.0, n)
    train = x + spread[:, None] * rng.standard_normal((n, D)) / np.sqrt(D)
    a, inv = np.ones(1), np.full(1, 40.0)  # logits from about -360 to -0.004
    table = random_table(rng, False, 6)
    index = ops.LabelIndex.from_labels(None)
    out, m, s, best = literal(train, x, a, inv, table, [np.arange(n)])
    T = torch.as_tensor
    for nt in (1, 2):
        got, stats, key, _ = ops.aligned_softmax(T(train.reshape(n, C, H, W)).to(dtype), T(x.reshape(1, C, H, W)).to(dtype),
                                                 T(a), T(inv), None, None, *index.tensors(), *table.tensors(), True,
                                                 "cpu", nt, 0)
        _check(got.double().numpy(), out, dtype, f"{order}, {nt} threads")
        assert np.allclose(stats[..., 1].numpy(), s, rtol=1e-5 if dtype == torch.float32 else 1e-10)
        assert np.array_equal(key.numpy(), best)


def chained_table(rows: int = 24, size: int = 256) -> ElementTable:
    """Rows whose neighbourhoods differ from the previous row's in six elements (three added, three dropped) but
    hold 78-101 runs (a shared scattered set plus a row's own elements), the kind the CPU engine sums from the
    previous row's distances (cpu/hood_chain.hpp); every sixth row a different pattern (a chain's end), one row
    empty."""
    hp, he = [0], []
    for r in range(rows):
        if r == 9:
            els = []
        elif r % 6 == 5:
            els = list(range(r, size, 3))
        else:
            els = sorted(set(range(0, 200, 2)) - {2 * r} | {201 + r, 230 + (r % 4)})
        he += els
        hp.append(len(he))
    return ElementTable(np.array(hp, np.int64), np.array(he, np.int32), None, np.arange(rows + 1, dtype=np.int64),
                        np.arange(rows, dtype=np.int32) * 7 % size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", ["long chains", "restarts"])
def test_rows_summed_from_the_previous_rows(dtype, case):
    """The CPU engine's chained rows in float32 (each row's distances from the previous row's, plus the elements it
    adds, less those it drops; a chain restarts where its rounding could exceed kChainSlack times the row's own
    element sum's; float64 sums every row on its own) against the literal loop, 300 images, 1 and 2 threads: "long
    chains" at high noise; "restarts": images near the query, one of them equal to it (over a) but on the rows' own
    elements, so that its distance is about what a row adds and drops and its chains restart every few rows."""
    rng = np.random.default_rng(11)
    n, size = 300, 256
    train = rng.uniform(-1, 1, (n, size))
    if case == "long chains":
        a, inv = np.full(1, 0.3), np.full(1, 0.6)
        x = 0.3 * train[17:18] + rng.standard_normal((1, size))
    else:
        a, inv = np.full(1, 0.8), np.full(1, 2.0)
        x = rng.uniform(-0.8, 0.8, (1, size))
        train = x / a + 0.05 * rng.standard_normal((n, size))
        train[17, :200] = x[0, :200] / a[0]
    table = chained_table(size=size)
    index = ops.LabelIndex.from_labels(None)
    out, m, s, best = literal(train, x, a, inv, table, [np.arange(n)])
    T = torch.as_tensor
    shape = (1, 16, 16)
    for nt in (1, 2):
        got, stats, key, _ = ops.aligned_softmax(T(train.reshape(n, *shape)).to(dtype),
                                                 T(x.reshape(1, *shape)).to(dtype), T(a), T(inv), None, None,
                                                 *index.tensors(), *table.tensors(), True, "cpu", nt, 0)
        _check(got.double().numpy(), out, dtype, f"{case}, {nt} threads")
        assert np.allclose(stats[..., 0].numpy(), m, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)
        assert np.allclose(stats[..., 1].numpy(), s, rtol=1e-5 if dtype == torch.float32 else 1e-10)
        assert np.array_equal(key.numpy(), best)


def test_chains_restart_where_their_rounding_would_exceed_the_rows_own():
    """Float32 chains that must restart: every row holds a scattered set of elements where three images are near the
    queries plus 56 elements where every image is far from them; rows 20-39 drop the far elements three at a time, so
    that a near image's distance shrinks to a small part of the terms its chain has added and dropped; rows 40-79
    toggle one near element each. Without the restart (a review's mutant: kChainSlack 1e30) the largest logit of the
    later rows was 3e-4 off relative; with it 1.6e-7, as without chains. The reference: the literal loop on the
    float32-rounded inputs (their rounding alone moves the logits by about 2e-5 here); 1 and 2 threads alike."""
    rng = np.random.default_rng(5)
    size, n = 256, 40
    a, inv = np.array([0.9, 0.9]), np.array([50.0, 8.0])
    x = rng.uniform(-0.5, 0.5, (2, size))
    x[:, 200:] = 1.0
    train = rng.uniform(-1, 1, (n, size))
    train[:3] = x[[0, 1, 0]] / a[0] + 0.01 * rng.standard_normal((3, size))
    train[:3, 200:] = -1.0
    near = set(np.flatnonzero(rng.random(200) < 0.55).tolist())
    rows, cur = [], near | set(range(200, size))
    for r in range(80):
        if 20 <= r < 40:
            cur -= set(sorted(cur - near)[:3])
        elif r >= 40:
            cur ^= {int(rng.integers(0, 200))}
        rows.append(sorted(cur))
    table = ElementTable(np.cumsum([0] + [len(v) for v in rows]).astype(np.int64),
                         np.concatenate(rows).astype(np.int32), None, np.arange(81, dtype=np.int64),
                         (np.arange(80) * 3 % size).astype(np.int32))
    train32, x32 = (torch.as_tensor(v, dtype=torch.float32) for v in (train, x))
    out, m, s, best = literal(train32.double().numpy(), x32.double().numpy(), a, inv, table, [np.arange(n)] * 2)
    index = ops.LabelIndex.from_labels(None)
    T = torch.as_tensor
    runs = [ops.aligned_softmax(train32.reshape(n, 1, 16, 16), x32.reshape(2, 1, 16, 16), T(a), T(inv), None, None,
                                *index.tensors(), *table.tensors(), True, "cpu", nt, 0) for nt in (1, 2)]
    assert all(torch.equal(u, v) for u, v in zip(runs[0], runs[1]))
    got, stats, key, _ = runs[0]
    _check(got.double().numpy(), out, torch.float32, "restarting chains")
    rel = np.abs(stats[..., 0].numpy() - m) / np.abs(m)
    assert rel.max() <= 1e-6, f"largest logit {rel.max():.2g} off relative"
    assert np.array_equal(key.numpy(), best)


def test_float32_data_whose_squared_distances_overflow_are_refused():
    """A training value of 2e19 overflows float32 when squared, whatever the (tiny) inverse temperature: refused
    before any work (the CPU engine's prefix sums then held inf - inf = NaN, and the maximum's search ran past its
    block: a review's reproducer). In float64 the same data are taken and the row, which leaves that element out,
    is right (its prefix differences would lose the row's distance to cancellation: the engine sums it element by
    element there), its gradient too."""
    rng = np.random.default_rng(0)
    n = 16
    train = rng.uniform(-1, 1, (n, D))
    train[15, 0] = 2e19
    x = rng.uniform(-1, 1, (1, D))
    table = ElementTable(np.array([0, 30], np.int64), np.arange(10, 40, dtype=np.int32), None,
                         np.array([0, 1], np.int64), np.array([20], np.int32))
    index = ops.LabelIndex.from_labels(None)
    T = torch.as_tensor
    call = lambda dt: ops.aligned_softmax(T(train.reshape(n, C, H, W)).to(dt), T(x.reshape(1, C, H, W)).to(dt),
                                         T(np.ones(1)), T(np.full(1, 1e-12)), None, None, *index.tensors(),
                                         *table.tensors(), True, "cpu", 1, 0)
    with pytest.raises(ValueError, match="too large for float32.*squared distances"):
        call(torch.float32)
    out, _, key, _ = call(torch.float64)
    els = np.arange(10, 40)
    logits = -1e-12 * ((x[0, els] - train[:, els]) ** 2).sum(1)
    w = np.exp(logits - logits.max())
    assert key.item() == int(np.argmax(logits))
    assert abs(out.item() - (w * train[:, 20]).sum() / w.sum()) <= 1e-9
    xs = T(x.reshape(1, C, H, W)).requires_grad_(True)
    got = ops.aligned_softmax(T(train.reshape(n, C, H, W)), xs, T(np.ones(1)), T(np.full(1, 1e-12)), None, None,
                              *index.tensors(), *table.tensors(), False, "cpu", 1, 0)[0]
    g = torch.autograd.grad(got.sum(), xs)[0].reshape(-1).numpy()
    # d out / d x[e] = sum_n w_n (phi_n[20] - out) * d l_n / d x[e], d l_n / d x[e] = -2e-12 (x[e] - phi_n[e])
    p = w / w.sum()
    want = np.zeros(D)
    want[els] = (p[:, None] * (train[:, 20] - out.item())[:, None] * -2e-12 * (x[0, els] - train[:, els])).sum(0)
    assert np.abs(want).max() > 0 and np.abs(g - want).max() <= 1e-7 * np.abs(want).max()


def _grads(train, x, a, inv, qlab, index, table, backend, device="cpu"):
    xs = torch.as_tensor(x.reshape(B, C, H, W)).to(device).requires_grad_(True)
    aa = torch.as_tensor(a).to(device).requires_grad_(True)
    ss = torch.as_tensor(inv).to(device).requires_grad_(True)
    out = ops.aligned_softmax(torch.as_tensor(train.reshape(N, C, H, W)).to(device), xs, aa, ss, None,
                              torch.as_tensor(qlab), *index.tensors(), *table.tensors(), False, backend, 0, 0)[0]
    g = torch.sin(torch.arange(out.numel(), dtype=out.dtype, device=out.device)).reshape(out.shape)
    return [v.cpu() for v in torch.autograd.grad((out * g).sum(), (xs, aa, ss))]


def test_gradients_gradcheck_and_engines_agree(dev):  # noqa: F811
    train, x, a, inv, labels, qlab, index, table = _case(4, True)
    xs = torch.as_tensor(x.reshape(B, C, H, W)).requires_grad_(True)
    aa, ss = torch.as_tensor(a).requires_grad_(True), torch.as_tensor(inv).requires_grad_(True)
    f = lambda xx, av, sv: ops.aligned_softmax(torch.as_tensor(train.reshape(N, C, H, W)), xx, av, sv, None,
                                               torch.as_tensor(qlab), *index.tensors(), *table.tensors(), False, "cpu",
                                               0, 0)[0]
    assert torch.autograd.gradcheck(f, (xs, aa, ss), eps=1e-6, atol=1e-6)
    ref = _grads(train, x, a, inv, qlab, index, table, "torch")
    for backend, device in (("cpu", "cpu"), ("cuda", dev)):
        got = _grads(train, x, a, inv, qlab, index, table, backend, device)
        for u, v in zip(got, ref):
            assert torch.allclose(u, v, rtol=1e-9, atol=1e-10), backend


def test_patch_table_and_dense_table():
    w = torch.tensor([[0, 1, 0], [1, 2, 1], [0, 1, 0]], dtype=torch.float64)
    hp, he, hw, rp, re = ops.patch_table(w, 2, 3, 4, None)
    assert hp.tolist()[:3] == [0, 6, 14]  # corner pixel: centre, right, below, in 2 channels
    assert he[:6].tolist() == [0, 1, 4, 12, 13, 16] and hw[:6].tolist() == [2, 1, 1, 2, 1, 1]
    assert rp.tolist() == list(range(0, 25, 2)) and re[:4].tolist() == [0, 12, 1, 13]
    pixels = torch.zeros(3, 4, dtype=torch.bool)
    pixels[1, 2] = True
    hp, he, hw, rp, re = ops.patch_table(w, 1, 3, 4, pixels)
    assert hp.tolist() == [0, 5] and he.tolist() == [2, 5, 6, 7, 10] and re.tolist() == [6]
    dense = torch.zeros(3, 6, dtype=torch.float64)
    dense[0, [1, 4]] = 1.0
    dense[1, 0] = 0.5
    dense[2, [0, 2, 5]] = 2.0
    hp, he, hw = ops.dense_table(dense)
    assert hp.tolist() == [0, 2, 3, 6] and he.tolist() == [1, 4, 0, 0, 2, 5] and hw.tolist() == [1, 1, .5, 2, 2, 2]


def test_composite_averages_overlapping_responses():
    rows = torch.tensor([[1.0, 3.0, 5.0]])
    resp = torch.tensor([0, 0, 2])
    count = torch.tensor([2.0, 0.0, 1.0])
    assert ops.composite(rows, resp, count, (1, 3)).tolist() == [[2.0, 0.0, 5.0]]


def test_bad_tables_are_refused_before_any_work():
    train, x, a, inv, labels, qlab, index, table = _case(5, True)
    hp, he, hw, rp, re = table.tensors()
    bad = {
        "hood_ptr must rise from 0": (torch.cat([hp[:1], hp[2:3], hp[1:2], hp[3:]]), he, hw, rp, re),
        "by at least one per row": (hp, he, hw, torch.cat([rp[:2], rp[1:2], rp[3:]]), re),
        "outside 0..39": (hp, torch.where(he == he[0], 40, he), hw, rp, re),
        "ascending and distinct": (hp, torch.cat([he[1:2], he[:1], he[2:]]) if int(hp[1]) > 1 else he.flip(0), hw, rp,
                                   re),
        "finite weight > 0": (hp, he, -hw, rp, re),
        "same rows": (hp, he, hw, rp[:-1], re[: int(rp[-2])]),
        "one finite weight": (hp, he, hw[:-1], rp, re),
    }
    T = torch.as_tensor
    for what, tab in bad.items():
        with pytest.raises(ValueError, match=what):
            ops.aligned_softmax(T(train.reshape(N, C, H, W)), T(x.reshape(B, C, H, W)), T(a), T(inv), None,
                                T(qlab), *index.tensors(), *tab, False, "cpu", 0, 0)
    with pytest.raises(ValueError, match="NaN"):
        ops.aligned_softmax(T(train.reshape(N, C, H, W)), T(np.full((B, C, H, W), np.nan)), T(a), T(inv), None,
                            T(qlab), *index.tensors(), *table.tensors(), False, "cpu", 0, 0)
    with pytest.raises(ValueError, match="label 9"):
        ops.aligned_softmax(T(train.reshape(N, C, H, W)), T(x.reshape(B, C, H, W)), T(a), T(inv), None,
                            T([0, 9, 0]), *index.tensors(), *table.tensors(), False, "cpu", 0, 0)


def test_the_compiled_core_checks_the_table_itself():
    """The C++ validation (validate.hpp) refuses what the Python check would have: the table reaches no kernel
    unchecked."""
    from patchmosaic.ops import contract, engines

    train, x, a, inv, labels, qlab, index, table = _case(6, False)
    grp = ops.groups(torch.as_tensor(qlab), *index.tensors(), N, B)
    bad = ElementTable(table.hood_ptr, table.hood_elem[::-1].copy(), None, table.resp_ptr, table.resp_elem)
    out, stats = torch.zeros(B, len(table.resp_elem), dtype=torch.float64), torch.zeros(B, table.n_rows, 2,
                                                                                         dtype=torch.float64)
    call = contract.aligned_call(engines._CPU_MODULE, train=torch.as_tensor(train), query=torch.as_tensor(x),
                                 table=bad, a=torch.as_tensor(a), inv_2b2=torch.as_tensor(inv), groups=grp, out=out,
                                 stats=stats)
    with pytest.raises(ValueError, match="ascending and distinct"):
        engines._CPU_MODULE.aligned_forward_cpu(call)


def test_the_table_plan_is_derived_once_and_refused_for_another_table():
    """The CPU engine's HoodPlan (a table's runs and chains, derived at its first call and kept with the table):
    outputs with the kept plan equal those of a call that derives its own, bit for bit, in both dtypes; the plan is
    kept once per module and dtype; a plan handed to a call on another table, or of another dtype, is refused."""
    from patchmosaic.ops import contract, engines

    train, x, a, inv, labels, qlab, index, table = _case(8, False)
    other = random_table(np.random.default_rng(9), False)
    grp = ops.groups(torch.as_tensor(qlab), *index.tensors(), N, B)
    module = engines._CPU_MODULE

    kept = []  # the call's buffers, alive while it may run (a call holds their addresses only)

    def call(tab, dtype):
        out = torch.zeros(B, len(tab.resp_elem), dtype=dtype)
        stats = torch.zeros(B, tab.n_rows, 2, dtype=torch.float64)
        tr, q = torch.as_tensor(train).to(dtype), torch.as_tensor(x).to(dtype)
        kept.append((tr, q))
        c = contract.aligned_call(module, train=tr, query=q, table=tab, a=torch.as_tensor(a),
                                  inv_2b2=torch.as_tensor(inv), groups=grp, out=out, stats=stats)
        return c, out, stats

    plans = {}
    for dtype in (torch.float32, torch.float64):
        c, out, stats = call(table, dtype)
        (plan,) = engines.hood_plan(engines.CPU, c, table, dtype)
        assert engines.hood_plan(engines.CPU, c, table, dtype)[0] is plan
        module.aligned_forward_cpu(c, plan)
        c2, out2, stats2 = call(table, dtype)
        module.aligned_forward_cpu(c2)
        assert torch.equal(out, out2) and torch.equal(stats, stats2)
        plans[dtype] = plan
    assert sum(key[0] == "hood_plan" for key in table.derived) == 2
    c, _, _ = call(other, torch.float32)
    with pytest.raises(ValueError, match="another element table or dtype"):
        module.aligned_forward_cpu(c, plans[torch.float32])
    c, _, _ = call(table, torch.float32)
    with pytest.raises(ValueError, match="another element table or dtype"):
        module.aligned_forward_cpu(c, plans[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_empty_neighbourhoods_average_every_image_of_the_group(dtype):
    """Rows with an empty neighbourhood (a constant pixel's row in a PCA-locality mask), which the CPU engine folds
    without distances or exponentials: every logit 0, so the output is the group's mean at the response, the largest
    logit 0, the sum of weights the group's size, the winner its first image and its share 1 / size; over several
    parts (1,100 images, of which 733 in the queried classes, a short last block), next to rows that are not empty
    and rows chained from their predecessor."""
    rng = np.random.default_rng(21)
    n, size = 1100, 256
    train = rng.uniform(-1, 1, (n, size))
    labels = rng.integers(0, 3, n)
    labels[:5] = 2  # the first images of class 0 come later
    index = ops.LabelIndex.from_labels(labels)
    base = chained_table(rows=50, size=size)
    empty = {0, 1, 7, 30, 31, 32, 49}  # first rows, single ones and a run of them, the last row
    hp, he = [0], []
    for r in range(base.n_rows):
        if r not in empty:
            he += base.hood_elem[base.hood_ptr[r]:base.hood_ptr[r + 1]].tolist()
        hp.append(len(he))
    table = ElementTable(np.array(hp, np.int64), np.array(he, np.int32), None, base.resp_ptr, base.resp_elem)
    assert max(empty) == table.n_rows - 1
    qlab = np.array([0, 1])
    x = rng.uniform(-0.8, 0.8, (2, size))
    a, inv = np.full(2, 0.3), np.full(2, 0.6)
    groups = [np.nonzero(labels == q)[0] for q in qlab]
    out, m, s, best = literal(train, x, a, inv, table, groups)
    T = torch.as_tensor
    got, stats, key, share = ops.aligned_softmax(T(train.reshape(n, 1, 16, 16)).to(dtype),
                                                 T(x.reshape(2, 1, 16, 16)).to(dtype), T(a), T(inv), None, T(qlab),
                                                 *index.tensors(), *table.tensors(), True, "cpu", 0, 0)
    _check(got.double().numpy(), out, dtype, "out")
    rows = sorted(empty)
    for b, g in enumerate(groups):
        slot = table.resp_ptr[rows]  # (one response element per row)
        assert np.allclose(got[b, slot].double().numpy(), train[g][:, table.resp_elem[slot]].mean(0),
                           atol=1e-12 if dtype == torch.float64 else 1e-6)
        assert np.all(stats[b, rows, 0].numpy() == 0) and np.all(stats[b, rows, 1].numpy() == len(g))
        assert np.all(key[b, rows].numpy() == g[0])
        assert np.allclose(share[b, rows].double().numpy(), 1 / len(g), rtol=1e-6)
    assert np.allclose(stats[..., 0].numpy(), m, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)
    assert np.allclose(stats[..., 1].numpy(), s, rtol=1e-5 if dtype == torch.float32 else 1e-10)
    assert np.array_equal(key.numpy(), best)


def test_ls_keeps_the_plain_patch_tables_and_their_plans():
    """LS's plain square patch (no mask, every pixel) is one element table per patch size and canvas, made at the
    first call and reused (with the engine's plan kept on it), also where that first call runs under a torch.func
    transform; the outputs equal a fresh machine's for each k, in any order of calls."""
    import patchmosaic as pm
    from patchmosaic.ops import aligned

    rng = np.random.default_rng(5)
    images = rng.uniform(-1, 1, (60, 2, 6, 5))
    q = torch.as_tensor(rng.uniform(-1, 1, (2, 2, 6, 5)))
    ls = pm.LS(images)
    g = torch.func.grad(lambda v: ls.denoise(v, 0.4, 3).square().sum())(q)  # the first call: under a transform
    assert torch.isfinite(g).all()
    tables = {}
    for k in (3, 5, 3, 7, 5):
        got = ls.denoise(q, 0.4, k)
        want = pm.LS(images).denoise(q, 0.4, k)
        assert torch.equal(got, want), k
        table = ls.rows(None, k, None, None, 2, 6, 5)
        assert tables.setdefault(k, table) is table  # the same tensors at every call with this k
        element_table = aligned._table(*table[:5], q)
        assert any(key[0] == "hood_plan" for key in element_table.derived)
    assert sorted(ls._kept_rows.keys()) == [(k, 2, 6, 5, "centre") for k in (3, 5, 7)]


def test_kept_tables_stay_within_their_budget(monkeypatch):
    """A sweep over many patch sizes keeps only the most recent tables within the budget of neighbourhood elements,
    and a table above the budget is not kept; the outputs do not change."""
    import patchmosaic as pm
    from patchmosaic.machines.same_position import KeptTables

    rng = np.random.default_rng(6)
    images = rng.uniform(-1, 1, (30, 1, 8, 8))
    q = torch.as_tensor(rng.uniform(-1, 1, (1, 1, 8, 8)))
    ls = pm.LS(images)
    size = {k: int(ls.rows(None, k, None, None, 1, 8, 8)[1].numel()) for k in (3, 5, 7, 9, 11)}
    monkeypatch.setattr(KeptTables, "BUDGET", size[9] + size[7])
    ls = pm.LS(images)
    for k in (3, 5, 7, 9):
        assert torch.equal(ls.denoise(q, 0.5, k), pm.LS(images).denoise(q, 0.5, k))
    assert [key[0] for key in ls._kept_rows.keys()] == [7, 9]  # 3 and 5 went first
    ls.denoise(q, 0.5, 7)  # used again: now the most recent
    monkeypatch.setattr(KeptTables, "BUDGET", size[7] + size[3] + 1)
    ls.denoise(q, 0.5, 3)
    assert [key[0] for key in ls._kept_rows.keys()] == [7, 3]
    monkeypatch.setattr(KeptTables, "BUDGET", size[11] - 1)
    assert torch.equal(ls.denoise(q, 0.5, 11), pm.LS(images).denoise(q, 0.5, 11))
    assert 11 not in [key[0] for key in ls._kept_rows.keys()]


def test_constants_first_made_under_inference_mode_serve_autograd_later():
    """A machine's kept tables made by a first call under torch.inference_mode() are ordinary tensors: a later call
    that autograd records works (LS's patch tables, PCA-locality's mask tables)."""
    import patchmosaic as pm

    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, (40, 1, 6, 6))
    q = torch.as_tensor(rng.uniform(-1, 1, (1, 1, 6, 6)))
    for machine, args in ((pm.LS(images), (0.4, 3)), (pm.PCALocality(images, threshold=0.05), (0.4,))):
        with torch.inference_mode():
            first = machine.denoise(q, *args)
        x = q.clone().requires_grad_()
        out = machine.denoise(x, *args)
        out.sum().backward()
        assert torch.equal(out.detach(), first) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_element_tables_copy_without_their_plans():
    """copy.deepcopy and dataclasses.replace of a table that carries an engine plan give a table of their own arrays
    with nothing derived (a replaced weight is not answered from the old table's kept sum)."""
    import copy
    import dataclasses

    from patchmosaic.ops import contract, engines

    train, x, a, inv, labels, qlab, index, table = _case(4, True)
    grp = ops.groups(torch.as_tensor(qlab), *index.tensors(), N, B)
    tr, q = torch.as_tensor(train), torch.as_tensor(x)
    out, stats = torch.zeros(B, len(table.resp_elem), dtype=torch.float64), torch.zeros(B, table.n_rows, 2,
                                                                                          dtype=torch.float64)
    call = contract.aligned_call(engines._CPU_MODULE, train=tr, query=q, table=table, a=torch.as_tensor(a),
                                 inv_2b2=torch.as_tensor(inv), groups=grp, out=out, stats=stats)
    (plan,) = engines.hood_plan(engines.CPU, call, table, torch.float64)
    first = table.largest_weight_sum()
    assert len(table.derived) == 2
    twin = copy.deepcopy(table)
    assert not twin.derived and np.array_equal(twin.hood_elem, table.hood_elem)
    heavier = dataclasses.replace(table, hood_weight=table.hood_weight * 5)
    assert not heavier.derived and heavier.largest_weight_sum() == pytest.approx(5 * first)
