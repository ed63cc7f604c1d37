"""The op layer (patchmosaic.ops): every op passes torch.library.opcheck (schema, autograd registration,
fake tensors, AOT dispatch with dynamic shapes), every machine of the registry compiles with
torch.compile(fullgraph=True) (every label form, neighbourhood masks) with results equal to eager mode, and the
package's imports run one way."""

import numpy as np
import pytest
import torch

import architecture
import patchmosaic as pm
from patchmosaic import ops
from patchmosaic.machines import keysets


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles its own functions (dynamo caches per code object, and these repeat)."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _inputs(seed=0, C=1, labelled=True):
    rng = np.random.default_rng(seed)
    train = torch.from_numpy(rng.uniform(-1, 1, (6, C, 5, 6)))
    labels = np.array([0, 1, 0, 1, 2, 2])
    index = ops.LabelIndex.from_labels(labels if labelled else None).tensors()
    x = torch.tensor(rng.standard_normal((2, C, 5, 6)), requires_grad=True)
    a = torch.tensor([0.9, 0.4], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([4.0, 0.6], dtype=torch.float64, requires_grad=True)
    return train, x, a, s, index


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("rule", keysets.RULES)
@pytest.mark.parametrize("provenance", [False, True])
def test_opcheck_local_softmax(rule, provenance, backend):
    train, x, a, s, index = _inputs()
    qc, kc, qpad, kpad = keysets.class_maps(rule, 5, 6, 5, 6, 3)
    part = qc.clone()
    part.view(5, 6)[[0, 4]] = -1  # rows 0 and 4 not computed
    for labels, query_class in ((torch.tensor([1, 2]), qc), (None, part)):
        args = (train, x, a, s, None, labels, *index, query_class, kc, qpad, kpad, 3, provenance, backend, 0, 0)
        torch.library.opcheck(ops.local_softmax, args)


def test_the_op_takes_class_maps_and_refuses_bad_ones():
    """The op layer knows no key-set rule: it takes the class maps a machine computed, and checks them before any
    work."""
    train, x, a, s, index = _inputs()
    qc, kc, qpad, kpad = keysets.class_maps("els_zeros", 5, 6, 5, 6, 3)
    args = lambda q, k, qp=qpad, kp=kpad: (train, x.detach(), a.detach(), s.detach(), None, None, *index, q, k, qp, kp,
                                           3, False, "cpu", 0, 0)
    ops.local_softmax(*args(qc, kc))
    with pytest.raises(ValueError, match="query_class must be a flat int64 tensor with one class per pixel of the "
                                         "5x6 query canvas"):
        ops.local_softmax(*args(qc[:-1], kc))
    with pytest.raises(ValueError, match="key_class must be a flat int64"):
        ops.local_softmax(*args(qc, kc.double()))
    with pytest.raises(ValueError, match="padding codes"):
        ops.local_softmax(*args(qc, kc, 7))
    with pytest.raises(ValueError, match="no training position has the key class 99 of query pixel 3"):
        ops.local_softmax(*args(torch.where(torch.arange(30) == 3, 99, qc), kc))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("provenance", [False, True])
def test_opcheck_ideal_softmax(provenance, backend):
    train, x, a, s, index = _inputs(1, C=2)
    torch.library.opcheck(ops.ideal_softmax, (train, x, a, s, None, torch.tensor([0, 2]), *index, provenance,
                                              backend, 0, 0))


def test_opcheck_backward_ops():
    train, x, a, s, index = _inputs(2)
    xd, ad, sd = x.detach(), a.detach(), s.detach()
    cl = keysets.class_maps("els_zeros", 5, 6, 5, 6, 3)
    out, stats, _, _ = ops.local_softmax(train, xd, ad, sd, None, None, *index, *cl, 3, False, "cpu", 0, 0)
    torch.library.opcheck(ops.local_softmax_backward, (torch.randn_like(out), out, stats, train, xd, ad, sd, None,
                                                       *index, *cl, 3, "cpu", 0))
    out, stats, _, _ = ops.ideal_softmax(train, xd, ad, sd, None, None, *index, False, "cpu", 0, 0)
    torch.library.opcheck(ops.ideal_softmax_backward, (torch.randn_like(out), out, stats, train, xd, ad, sd, None,
                                                       *index, "cpu", 0))


def test_opcheck_candidate_softmax():
    train, x, a, s, _ = _inputs(3)
    rng = np.random.default_rng(3)
    pix = torch.tensor([0, 7, 29, 31, 59], dtype=torch.int64)
    cand = torch.from_numpy(rng.integers(0, 6 * 30, (5, 4)))
    cand[1, 3] = -1
    count = torch.ones(5, 4, dtype=torch.float64)
    for prov in (False, True):
        torch.library.opcheck(ops.candidate_softmax, (train, x.detach(), a.detach(), s.detach(), pix, cand, count, 3,
                                                      0, 0, prov, 0), test_utils=("test_schema", "test_faketensor",
                                                                                  "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_aligned_softmax_its_backward_and_jvp(dtype, weighted):
    train, x, a, s, index = _inputs(5, C=2)
    x = x.detach().to(dtype).requires_grad_(True)
    w = torch.ones(3, 3, dtype=torch.float64)
    if weighted:
        w[0, 0] = 0.5
    hp, he, hw, rp, re = ops.patch_table(w, 2, 5, 6, None)
    hw = hw if weighted else None
    for prov in (False, True):
        torch.library.opcheck(ops.aligned_softmax, (train, x, a, s, None, torch.tensor([1, 2]), *index, hp, he, hw,
                                                    rp, re, prov, "cpu", 0, 0))
    xd, ad, sd = x.detach(), a.detach(), s.detach()
    out, stats, _, _ = ops.aligned_softmax(train, xd, ad, sd, None, None, *index, hp, he, hw, rp, re, False, "cpu", 0,
                                           0)
    torch.library.opcheck(ops.aligned_softmax_backward, (torch.randn_like(out), out, stats, train, xd, ad, sd, None,
                                                         *index, hp, he, hw, rp, re, "cpu", 0))
    torch.library.opcheck(ops.aligned.aligned_softmax_jvp, (train, xd, ad, sd, None, *index, hp, he, hw, rp, re,
                                                            torch.randn_like(xd), None, torch.randn_like(sd)))


def test_opcheck_jvp_ops():
    train, x, a, s, index = _inputs(6)
    xd, ad, sd = x.detach(), a.detach(), s.detach()
    cl = keysets.class_maps("els_zeros", 5, 6, 5, 6, 3)
    mask = torch.tensor([[0., 1, 0], [1, 1, 1], [0, 1, 2]], dtype=torch.float64)
    for m in (None, mask):
        torch.library.opcheck(ops.library.local_softmax_jvp, (train, xd, ad, sd, None, *index, *cl, 3, m,
                                                              torch.randn_like(xd), torch.randn_like(ad), None))
    torch.library.opcheck(ops.library.ideal_softmax_jvp, (train, xd, ad, sd, None, *index, torch.randn_like(xd), None,
                                                          torch.randn_like(sd)))


def test_opcheck_tables_draws_and_checks():
    """The ops that build tables, draw noise or check values. dense_table's real outputs were views of
    torch.nonzero's (n, 2) result (stride 2, storage offset 1) where its fake promised fresh tensors."""
    w = torch.ones(3, 3, dtype=torch.float64)
    torch.library.opcheck(ops.patch_table, (w, 2, 5, 6, None))
    torch.library.opcheck(ops.patch_table, (w, 2, 5, 6, torch.rand(5, 6, generator=torch.Generator().manual_seed(0))
                                            > 0.5))
    dense = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    for weights in (dense, dense[2:], dense[:1, :2], dense > 0):  # an empty row, no element, one element, boolean
        torch.library.opcheck(ops.dense_table, (weights,))
    torch.library.opcheck(ops.library.seeded_normal, (torch.tensor([0.3, 0.5], dtype=torch.float64), 0, 3,
                                                      [2, 1, 3, 3]))
    train, x, a, s, index = _inputs(7)
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    torch.library.opcheck(ops.checks.check_values, (x.detach(), "x", t, a.detach(), s.detach()))
    torch.library.opcheck(ops.checks.check_labels, (torch.tensor([0, 2]), *index, 6))
    torch.library.opcheck(ops.checks.check_memory_op, (1024, "a small request", 0))


def test_ops_are_registered_with_torch_and_each_is_opchecked_here():
    """Every op the package registers under patchmosaic:: is registered with torch, and this file or its named
    neighbours (window_table: test_pspc; local_softmax on Triton: test_triton) runs opcheck on it."""
    import pathlib
    import re

    import patchmosaic.ops.triton_engine  # noqa: F401  (registers its ops, if any)

    root = pathlib.Path(pm.__file__).parent
    names = set()
    for path in root.rglob("*.py"):
        names |= set(re.findall(r'custom_op\("patchmosaic::(\w+)"', path.read_text()))
    assert len(names) >= 17, names
    here = pathlib.Path(__file__).parent
    checked = "".join((here / f).read_text() for f in ("test_ops.py", "test_pspc.py"))
    for name in sorted(names):
        assert hasattr(torch.ops.patchmosaic, name), name
        assert re.search(rf"opcheck\((?:pm\.)?ops\.(?:\w+\.)?{name}\b", checked) or \
            (name == "check_memory" and "opcheck(ops.checks.check_memory_op" in checked), f"{name}: no opcheck"


# ------------------------------------------------------------------------------------- compile
def _machines(dtype=torch.float32):
    rng = np.random.default_rng(4)
    train = torch.from_numpy(rng.uniform(-1, 1, (20, 1, 8, 8))).to(dtype)
    lab = torch.arange(20) % 3
    return {"ELS": pm.ELS(train, lab), "ELS_circular": pm.ELS(train, lab, boundary="circular"),
            "LS": pm.LS(train, lab), "IS": pm.IS(train, lab)}


@pytest.mark.parametrize("name", ["ELS", "ELS_circular", "LS", "IS"])
def test_compile_fullgraph_denoise_eps_score(name):
    m = _machines()[name]

    def f(x, t, labels):
        return m.denoise(x, t, 3) + m.eps(x, 0.4, 5, labels=labels) + m.score(x, t, 3, labels=labels)

    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    lab = torch.tensor([0, 2])
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for t in (0.3, torch.tensor([0.2, 0.7])):
        assert torch.equal(cf(x, t, lab), f(x, t, lab))
    # values checked inside the op, without a graph break
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\], got 1.5"):
        cf(x, torch.tensor([0.2, 1.5]), lab)
    with pytest.raises(ValueError, match="label 7 has no training images"):
        cf(x, 0.3, torch.tensor([0, 7]))


def test_compile_fullgraph_gradients_equal_eager():
    m = _machines(torch.float64)["ELS"]

    def f(x, t):
        return (m.score(x, t, 3) ** 2).sum()

    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64, requires_grad=True)
    eager = torch.autograd.grad(f(x, t), (x, t))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x, t), (x, t))
    assert all(torch.equal(u, v) for u, v in zip(eager, compiled))


def test_compile_fullgraph_whole_ddim_loop_inductor():
    """A whole 6-step DDIM with a k-schedule over a MachineDenoiser, compiled by the default backend
    (inductor) into one graph: the same samples as in eager mode."""
    m = _machines()["ELS"]
    den = pm.MachineDenoiser(m, pm.KSchedule.ramp(7, 3, 6))

    def sample(x1, labels):
        return pm.ddim(den, x1, labels, steps=6, progress=False)

    x1 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    lab = torch.tensor([0, 1, 2])
    compiled = torch.compile(sample, fullgraph=True)
    assert torch.allclose(compiled(x1, lab), sample(x1, lab), rtol=0, atol=1e-6)


# Every machine of the registry, with labels in every form the README writes them and with neighbourhood masks:
# one graph (fullgraph=True), the same results as eager mode (torch.equal), the value checks still raised when
# the graph runs. DataLocal and PCA-locality choose their neighbourhood by the value of t, so a graph is specialised
# on a Python float t (a tensor t is refused: test_compile_refuses_a_tensor_time_where_t_chooses_the_mask).
LABEL_FORMS = {"none": None, "tensor": torch.tensor([0, 2]), "list": [0, 2], "int": 1, "numpy": np.array([0, 2])}
TIME_BY_VALUE = ("datalocal", "pca")


def _registry_machine(name, dtype=torch.float32):
    rng = np.random.default_rng(5)
    train = torch.from_numpy(rng.uniform(-1, 1, (20, 1, 8, 8))).to(dtype)
    m = pm.make_machine(name, train, np.arange(20) % 3)
    return m, {"k": 5, "threshold": 0.02, "p": 4, None: None}[pm.MACHINES[name].parameter]


@pytest.mark.parametrize("name", list(pm.MACHINES))
def test_every_machine_answers_a_meta_query_with_a_meta_result(name):
    """Shapes without data: a query on the meta device gives the result's shape and dtype on it (Wiener and the
    smoothed denoiser once failed in their value check, 'Tensor.item() cannot be called on meta tensors')."""
    m, p = _registry_machine(name)
    for dtype in (torch.float32, torch.float64):
        out = m.denoise(torch.empty(2, 1, 8, 8, dtype=dtype, device="meta"), 0.4, p, [0, 2])
        assert out.device.type == "meta" and out.shape == (2, 1, 8, 8) and out.dtype == dtype, name


@pytest.mark.parametrize("labels", list(LABEL_FORMS))
@pytest.mark.parametrize("name", list(pm.MACHINES))
def test_compile_fullgraph_every_machine_and_label_form(name, labels):
    m, p = _registry_machine(name)
    lab = LABEL_FORMS[labels]

    def f(x, t):
        return m.denoise(x, t, p, lab)

    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    times = (0.3, 0.7) if name in TIME_BY_VALUE else (0.3, torch.tensor([0.2, 0.7]))
    for t in times:
        assert torch.equal(cf(x, t), f(x, t)), (name, labels, t)
    # values checked when the graph runs, without a graph break
    with pytest.raises(ValueError, match="x contains NaN"):
        cf(torch.full_like(x, float("nan")), 0.3)
    if name not in TIME_BY_VALUE:
        with pytest.raises(ValueError, match=r"t must lie in \(0, 1\], got 1.5"):
            cf(x, torch.tensor([0.2, 1.5]))
    if labels == "tensor":
        with pytest.raises(ValueError, match="label 7 has no training images"):
            torch.compile(lambda x: m.denoise(x, 0.3, p, torch.tensor([0, 7])), fullgraph=True,
                          backend="aot_eager")(x)


@pytest.mark.parametrize("mask", ["boolean", "weights", "numpy", "per_pixel"])
@pytest.mark.parametrize("name", ["ELS", "ELS_circular", "LS"])
def test_compile_fullgraph_with_patch_masks(name, mask):
    m = _machines()[name]
    rng = np.random.default_rng(6)
    w = torch.from_numpy(rng.uniform(0, 1, (3, 3)))
    w[1, 1] = 1.0
    per_pixel = torch.from_numpy(rng.uniform(0, 1, (8, 8, 3, 3)) > 0.4)
    per_pixel[..., 1, 1] = True
    pm_ = {"boolean": w > 0.5, "weights": w, "numpy": (w > 0.5).numpy(), "per_pixel": per_pixel}[mask]

    def f(x, lab):
        return m.denoise(x, 0.4, 3, lab, patch_mask=pm_)

    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for lab in (None, [0, 2]):
        assert torch.equal(cf(x, lab), f(x, lab))
    # a mask's values are checked when the graph runs
    bad = w.clone()
    bad[0, 0] = -1.0
    with pytest.raises(ValueError, match="negative weights"):
        torch.compile(lambda x: m.denoise(x, 0.4, 3, patch_mask=bad), fullgraph=True, backend="aot_eager")(x)


@pytest.mark.parametrize("name", TIME_BY_VALUE)
def test_compile_refuses_a_tensor_time_where_t_chooses_the_mask(name):
    m, p = _registry_machine(name)
    x = torch.randn(2, 1, 8, 8)
    cf = torch.compile(lambda x, t: m.denoise(x, t, p), fullgraph=True, backend="aot_eager")
    # dynamo reports the TypeError raised while tracing with its message
    with pytest.raises(torch._dynamo.exc.Unsupported, match="takes t as a Python float"):
        cf(x, torch.tensor([0.3, 0.6]))
    assert torch.equal(cf(x, 0.6), m.denoise(x, 0.6, p))


@pytest.mark.parametrize("name", ["datalocal", "wiener", "scfdm"])
def test_compile_fullgraph_inductor_keeps_the_checks(name):
    """The default backend (inductor) as well: the same result to float32 rounding (its kernels fuse and
    reorder: atol 1e-5 on values of order 1), and the checks, ops without an output, not removed."""
    m, p = _registry_machine(name)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    cf = torch.compile(lambda x, lab: m.denoise(x, 0.4, p, lab), fullgraph=True)
    assert torch.allclose(cf(x, [0, 2]), m.denoise(x, 0.4, p, [0, 2]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="x contains NaN"):
        cf(torch.full_like(x, float("nan")), [0, 2])
    with pytest.raises(ValueError, match="label 7 has no training images"):
        cf(x, [0, 7])


@pytest.mark.parametrize("name", TIME_BY_VALUE)
def test_compile_fullgraph_ddim_loop_with_a_mask_per_time(name):
    """A sampler passes t as a Python float: a 3-step DDIM over DataLocal or PCA-locality is one graph, each
    step's neighbourhood a constant of it, the samples those of eager mode."""
    m, p = _registry_machine(name)
    den = pm.MachineDenoiser(m, p)

    def sample(x1, labels):
        return pm.ddim(den, x1, labels, steps=3, progress=False)

    x1 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    lab = torch.tensor([0, 1])
    assert torch.equal(torch.compile(sample, fullgraph=True, backend="aot_eager")(x1, lab), sample(x1, lab))


# -------------------------------------------------------------------------------- architecture
def test_imports_run_one_way_and_only_ops_touches_the_core():
    pairs = architecture.imports()
    assert pairs  # the scan found the package's imports
    upward = [(a, b) for a, b in pairs if architecture.layer(b) > architecture.layer(a)]
    assert not upward, upward
    core = [a for a, b in pairs if b == "_core" and not a.startswith("ops")]
    assert not core, core
    assert any(b == "_core" and a.startswith("ops") for a, b in pairs)
    assert not architecture.cycles(pairs), architecture.cycles(pairs)


def test_no_module_reaches_into_another_objects_private_members():
    assert not architecture.private_reaches(), architecture.private_reaches()


def test_architecture_checks_can_fail(tmp_path, monkeypatch):
    """The scanner sees an upward import, a cycle and a private reach when there is one."""
    pkg = tmp_path / "patchmosaic"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "machines").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("from ..machines import thing\n")
    (pkg / "machines" / "__init__.py").write_text("from .. import ops\nx = ops._secret\n")
    monkeypatch.setattr(architecture, "PKG", str(pkg))
    pairs = architecture.imports()
    assert ("ops", "machines") in pairs and architecture.layer("machines") > architecture.layer("ops")
    assert architecture.cycles(pairs)
    assert architecture.private_reaches()


def test_shared_numerics_are_written_once():
    """The clamped exponential's cut, the softmax merge and the patch element codes are defined in
    cpp/include/patchmosaic only; the engines use them."""
    import glob
    import os
    import re

    root = os.path.join(os.path.dirname(__file__), "..", "cpp")
    shared = open(os.path.join(root, "include", "patchmosaic", "softmax_state.hpp")).read() + \
        open(os.path.join(root, "include", "patchmosaic", "patch_geometry.hpp")).read()
    for name in ("merge_state", "clamped_exp", "element_code", "struct ExpCut"):
        assert name in shared
    engines = glob.glob(os.path.join(root, "cpu", "*")) + glob.glob(os.path.join(root, "cuda", "*.c*"))
    for path in engines:
        src = open(path).read()
        assert not re.search(r"(MergeFactors|double|int32_t)\s+(merge_state|element_code)\s*\(", src), path
        assert "-87.0" not in src and "-700.0" not in src, path  # the cut comes from ExpCut
    used = "".join(open(p).read() for p in engines)
    assert "merge_state(" in used and "element_code(" in used and "ExpCut<T>" in used


def test_the_ops_refuse_arguments_whose_shapes_or_dtypes_disagree():
    """The public ops handed mismatched shapes to the compiled core, which trusts them: IS with queries of another
    size than the training images wrote past its buffers (the process died, or later: 'free(): invalid next
    size'), a query of 3 channels against 1-channel images returned channels never written, a and inv_2b2 of one
    value for two queries were read past their end, float labels were truncated, float16 queries gave a bare
    KeyError and an empty batch a RuntimeError. Each is now a ValueError or TypeError naming the op and the
    argument, before any work."""
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.uniform(-1, 1, (6, 1, 5, 6)))
    index = ops.LabelIndex.from_labels(np.arange(6) % 2).tensors()
    x = torch.from_numpy(rng.standard_normal((2, 1, 5, 6)))
    a, s = torch.tensor([0.9, 0.4], dtype=torch.float64), torch.tensor([4.0, 0.6], dtype=torch.float64)
    lab = torch.tensor([0, 1])
    cl = keysets.class_maps("els_zeros", 5, 6, 5, 6, 3)
    table = ops.patch_table(torch.ones(3, 3, dtype=torch.float64), 1, 5, 6, None)

    def local(q=x, aa=a, ss=s, t=None, labels=lab):
        return ops.local_softmax(train, q, aa, ss, t, labels, *index, *cl, 3, False, "cpu", 0, 0)

    def ideal(q=x, aa=a, labels=lab):
        return ops.ideal_softmax(train, q, aa, s, None, labels, *index, False, "cpu", 0, 0)

    def aligned(tr=train):
        return ops.aligned_softmax(tr, x, a, s, None, lab, *index, *table, False, "cpu", 0, 0)

    cases = [
        (lambda: ideal(q=x[:, :, :, :4].contiguous()), ValueError,
         r"ideal_softmax: x of shape \(2, 1, 5, 4\) against training images of shape \(6, 1, 5, 6\)"),
        (lambda: local(q=torch.from_numpy(rng.standard_normal((2, 3, 5, 6)))), ValueError,
         r"local_softmax: .* the queries must have the training images' channels"),
        (lambda: aligned(train[:, :, :, :2].contiguous()), ValueError, r"aligned_softmax: x of shape"),
        (lambda: local(aa=a[:1], ss=s[:1]), ValueError, r"local_softmax: a must hold one value per query image"),
        (lambda: ideal(aa=a[:1]), ValueError, r"ideal_softmax: a must hold one value per query image"),
        (lambda: local(t=torch.tensor([0.5, 0.5, 7.0])), ValueError, r"t must hold one value per query image"),
        (lambda: local(labels=lab[:1]), ValueError, r"labels must hold one value per query image"),
        (lambda: local(labels=torch.tensor([0.7, 1.9])), TypeError, r"local_softmax: labels must be integers"),
        (lambda: local(labels=torch.tensor([True, False])), TypeError, r"labels must be integers, got torch.bool"),
        (lambda: local(q=x.half()), TypeError, r"local_softmax: x must be float32 or float64, got torch.float16"),
        (lambda: ideal(q=x[:0], aa=a[:0], labels=None), ValueError, r"ideal_softmax: x holds no image"),
        (lambda: local(q=x[0]), ValueError, r"local_softmax: x must have shape \(B, C, H, W\)"),
    ]
    for call, err, msg in cases:
        with pytest.raises(err, match=msg):
            call()
    assert torch.isfinite(local()[0]).all() and torch.isfinite(ideal()[0]).all() and torch.isfinite(aligned()[0]).all()


def test_int32_offsets_the_backward_fakes_and_an_empty_states_out():
    """From a review of the op layer: an element table with int32 offsets (hood_ptr, resp_ptr) was kept int32 and
    read by the compiled core as int64 (refused with a misleading message, after reading past the buffer); the
    backward ops' fake implementations declared the gradients of a and inv_2b2 in a's dtype, where the real ones
    are float64 (opcheck failed for float32 a); merging a state with an empty one (s = 0) whose out held NaN gave
    NaN, though an empty state's out is documented as ignored."""
    from patchmosaic.ops.state import SoftmaxState, merge2

    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.uniform(-1, 1, (6, 1, 5, 6)))
    index = ops.LabelIndex.from_labels(None).tensors()
    x = torch.from_numpy(rng.standard_normal((2, 1, 5, 6)))
    a, s = torch.tensor([0.9, 0.4], dtype=torch.float64), torch.tensor([4.0, 0.6], dtype=torch.float64)
    hp, he, hw, rp, re = ops.patch_table(torch.ones(3, 3, dtype=torch.float64), 1, 5, 6, None)
    want = ops.aligned_softmax(train, x, a, s, None, None, *index, hp, he, None, rp, re, False, "cpu", 0, 0)[0]
    for backend in ("cpu", "torch"):
        got = ops.aligned_softmax(train, x, a, s, None, None, *index, hp.int(), he, None, rp.int(), re, False,
                                  backend, 0, 0)[0]
        assert torch.allclose(got, want, rtol=0, atol=1e-12), backend
    xg = x.clone().requires_grad_()
    a32, s32 = a.float().requires_grad_(), s.float().requires_grad_()
    cl = keysets.class_maps("els_zeros", 5, 6, 5, 6, 3)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.local_softmax, (train, xg, a32, s32, None, None, *index, *cl, 3, False, "cpu", 0, 0),
                          test_utils=checks)
    out, st, _, _ = ops.ideal_softmax(train, x, a, s, None, None, *index, False, "cpu", 0, 0)
    torch.library.opcheck(ops.ideal_softmax_backward, (torch.randn_like(out), out, st, train, x, a.float(), s.float(),
                                                       None, *index, "cpu", 0), test_utils=checks)
    f64 = torch.float64
    empty = SoftmaxState(torch.tensor([-float("inf")], dtype=f64), torch.tensor([0.0], dtype=f64),
                         torch.tensor([[float("nan"), float("inf")]]))
    full = SoftmaxState(torch.tensor([1.0], dtype=f64), torch.tensor([2.0], dtype=f64), torch.tensor([[0.5, -0.25]]))
    assert merge2(empty, full).out.tolist() == [[0.5, -0.25]] and merge2(full, empty).out.tolist() == [[0.5, -0.25]]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_label_tables_an_op_caller_passes_are_checked_by_every_engine(backend):
    """The compiled CPU engine refused a label index with an empty group in use or an image index past N; the
    Triton engine returned unwritten memory for the first and read past the training images for the second, and
    the torch reference returned NaN. The tables are now checked once, before any engine runs."""
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.uniform(-1, 1, (4, 1, 5, 6)))
    x = torch.from_numpy(rng.standard_normal((1, 1, 5, 6)))
    a, s = torch.tensor([0.9], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)
    cl = keysets.class_maps("els_zeros", 5, 6, 5, 6, 3)
    vals = torch.tensor([0, 1])
    for ptr, imgs, lab, msg in (([0, 4, 4], [0, 1, 2, 3], 1, r"label 1 has no training images \(its group"),
                                ([0, 2, 4], [0, 1, 2, 9], 0, r"label_images holds an index outside 0\.\.3"),
                                ([0, 3], [0, 1, 2], 0, r"label_ptr rise from 0"),
                                ([0, 2, 4], [0, 1, 2, -1], 1, r"outside 0\.\.3")):
        index = (vals, torch.tensor(ptr), torch.tensor(imgs, dtype=torch.int32))
        for call in (lambda: ops.local_softmax(train, x, a, s, None, torch.tensor([lab]), *index, *cl, 3, False,
                                               backend, 0, 0),
                     lambda: ops.ideal_softmax(train, x, a, s, None, torch.tensor([lab]), *index, False, backend, 0, 0)):
            with pytest.raises(ValueError, match=msg):
                call()


def test_is_statistics_hold_the_largest_logit_in_every_engine():
    """IS's partial maximum was the largest logit in the compiled engines and that plus s |x|^2 in the torch
    reference (and in the Triton engine where the reference ran its backward): key shards computed by different
    engines merged two conventions (1.1-1.6 off). Now every engine's is the largest logit itself."""
    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.uniform(-1, 1, (6, 1, 4, 4)))
    x = torch.from_numpy(rng.standard_normal((2, 1, 4, 4)))
    a, s = torch.tensor([0.8, 0.5], dtype=torch.float64), torch.tensor([1.5, 0.7], dtype=torch.float64)
    index = ops.LabelIndex.from_labels(None).tensors()
    logits = -((x.reshape(2, 1, -1) - a[:, None, None] * train.reshape(1, 6, -1)) ** 2).sum(-1) * s[:, None]
    for backend in ("cpu", "torch"):
        stats = ops.ideal_softmax(train, x, a, s, None, None, *index, False, backend, 0, 0)[1]
        assert torch.allclose(stats[:, 0], logits.max(1).values, rtol=1e-12, atol=1e-12), backend
        assert torch.allclose(stats[:, 1], torch.exp(logits - logits.max(1, keepdim=True).values).sum(1)), backend
