"""The Triton engine's own properties (its exactness and gradients are tested beside the other engines': test_exactness,
test_gradients, test_multi_k, test_masks): its split precision is the one the error budget models, its tiling, key
splits, patch chunks and skip change nothing but rounding (the skip not even that), provenance ties go to the same
key as on the CPU engine, bad setups are refused with the reason, and ``auto`` follows the measured table.

Without a GPU every kernel here runs under Triton's interpreter (conftest.py), on small cases."""

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cases import build, draw, queries
from triton_cases import DEVICE, needs_triton

import patchmosaic as pm
from patchmosaic import ops
from patchmosaic.machines import keysets
from patchmosaic.ops import reference, triton_engine
from patchmosaic.ops.triton_engine import auto, precision

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RANGE = 2.0


@pytest.fixture
def knobs():
    """The engine's settings, restored after the test."""
    saved = dict(vars(triton_engine.settings))
    yield triton_engine.settings
    for k, v in saved.items():
        setattr(triton_engine.settings, k, v)


def _x(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)


# ------------------------------------------------------------------------------------------- arithmetic
def test_exp_cut_is_the_compiled_engines():
    src = open(os.path.join(ROOT, "cpp", "include", "patchmosaic", "softmax_state.hpp")).read()
    cut = float(re.search(r"ExpCut<float>\s*{\s*static constexpr double value = ([0-9.]+);", src).group(1))
    kernels = open(os.path.join(ROOT, "python", "patchmosaic", "ops", "triton_engine", "kernels.py")).read()
    assert f"EXP_CUT: tl.constexpr = tl.constexpr({cut})" in kernels


def test_split_halves_are_tf32_and_sum_to_the_value():
    x = torch.randn(4096) * torch.logspace(-20, 20, 4096)
    hi, lo = precision.split(x)
    assert int((hi.view(torch.int32) & 0x1FFF).abs().max()) == 0 and int((lo.view(torch.int32) & 0x1FFF).abs().max()) == 0
    rel = ((x.double() - hi.double() - lo.double()).abs() / x.double().abs()).max()
    assert rel <= 2.0 ** -21  # lo cut to 10 bits below its own leading bit: |x - hi - lo| <= 2^-10 |lo| <= 2^-21 |x|
    # round to nearest, ties away from zero
    tie = torch.tensor([1 + 2.0 ** -11, -(1 + 2.0 ** -11), 1 + 2.0 ** -12], dtype=torch.float32)
    assert precision.tf32_hi(tie).tolist() == [1 + 2.0 ** -10, -(1 + 2.0 ** -10), 1.0]


def test_budget_model_brackets_float32():
    """The accumulation models of the budget on random patches: a fresh accumulator per chunk keeps truncation at
    float32's level; one carried through a long patch does not (why the kernel flushes per chunk)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(32, 529, generator=g), torch.rand(256, 529, generator=g)
    ref = q.double() @ k.double().T
    unit = 2.0 ** -24 * (q.double().abs() @ k.double().abs().T)
    err = {m: float(((precision.split_dot(q, k, m.split("_")[0], 32, flush=m != "rz_carry").double() - ref).abs()
                     / unit).max()) for m in ("rz", "rz_carry", "rn", "ieee")}
    assert err["rz"] < 2 * err["ieee"] and err["rn"] < 2 * err["ieee"] and err["rz_carry"] > 3 * err["rz"], err


@needs_triton
def test_kernel_gathers_and_splits_the_query_patches_as_the_emulation():
    from patchmosaic.ops.triton_engine import local, plan as planning

    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (3, 2, 6, 7)).astype(np.float32)
    x = _x(rng.standard_normal((2, 2, 9, 8)).astype(np.float32))
    for machine, k in ((pm.ELS(train), 5), (pm.ELS(train, boundary="circular"), 3)):
        ks = machine.keyset(9, 8, k) if machine.rule == "els_zeros" else machine.keyset(6, 7, k)
        xx = x if machine.rule == "els_zeros" else x[:, :, :6, :7].contiguous()
        grp = SimpleNamespace(grp_img_ptr=np.array([0, 3]), grp_img=np.arange(3, dtype=np.int32),
                              group_of_b=np.zeros(2, np.int32))
        elem = planning.elements(k, 2, ks.n_classes, None)
        p = planning.plan(ks, grp, 2, elem, 16, 1 << 30, 16)
        dev = (local._dev(elem.ch, DEVICE), local._dev(elem.dr, DEVICE), local._dev(elem.dc, DEVICE),
               torch.zeros(1, device=DEVICE))
        d_pad = triton_engine.tuning.d_pad(elem.max_count, triton_engine.interpreted())
        hi, lo = local._query_patches(xx, p, elem, dev, d_pad, ks.query_pad == ops.CIRCULAR, True)
        Q = reference.patches(xx.cpu(), torch.from_numpy(p.row_b.astype(np.int64)),
                              torch.from_numpy(p.row_pix.astype(np.int64)), k, ks.query_pad)
        ehi, elo = precision.split(Q)
        d = Q.shape[1]
        assert torch.equal(hi[:, :d].cpu(), ehi) and torch.equal(lo[:, :d].cpu(), elo)
        assert not hi[:, d:].cpu().any()


@needs_triton
def test_kernels_compile_for_hopper_without_a_gpu():
    """Every kernel, switches on and off, C = 1 and 3, compiled to sm_90 machine code by Triton's compiler and the
    ptxas it ships (tests/triton_aot.py, in a subprocess: this process runs the interpreter), within an H100's
    shared memory."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton has no bundled ptxas to compile for NVIDIA GPUs with")
    # the package this process imported (installed, or a source tree on PYTHONPATH), not a guess at its place
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_aot.py"), "90"], capture_output=True,
                         text=True, timeout=900, env=env)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert res.returncode == 0 and len(rows) == 6, res.stdout[-2000:] + res.stderr[-2000:]
    assert all(r["shared"] <= 227 * 1024 and r["registers"] <= 255 for r in rows), rows


# --------------------------------------------------------------------------------- tiles, splits, skip
CASES = [draw(14), draw(13), draw(39), draw(6)]  # boundary ELS on a larger canvas; LS; wrapped periodic ELS; C = 3


@needs_triton
@pytest.mark.parametrize("i", range(len(CASES)))
def test_small_tiles_key_splits_and_patch_chunks_change_only_rounding(i, knobs):
    """16-row, 16-key tiles, 16-element patch chunks and work items of 24 keys (merged in key order) against the
    default tiles, and provenance against the CPU engine (ties included: these cases repeat keys)."""
    case = CASES[i]
    x = queries(case, 14 + i).astype(np.float32)
    m = build(case, np.float32)
    args = (_x(x), torch.from_numpy(case.t), case.k)
    kw = dict(labels=torch.from_numpy(case.qlabels), backend="triton", return_provenance=True)
    big, pbig = m.denoise(*args, **kw)
    knobs.block_m, knobs.block_n, knobs.block_d, knobs.keys_per_item = 16, 16, 16, 24
    small, psmall = m.denoise(*args, **kw)
    assert (small - big).abs().max() <= 1e-5 * RANGE, case
    ref, pref = m.denoise(x, case.t, case.k, labels=case.qlabels, return_provenance=True, backend="cpu")
    for p in (pbig, psmall):
        assert np.array_equal(p.image.cpu().numpy(), pref.image) and np.array_equal(p.row.cpu().numpy(), pref.row)
        assert np.array_equal(p.col.cpu().numpy(), pref.col)
        assert np.abs(p.share.cpu().numpy() - pref.share).max() <= 1e-4


@needs_triton
def test_skip_fires_and_changes_no_bit(knobs):
    """Distinct random patches at t = 0.02: every key tile without the query's own patches lies thousands below the
    running maximum, and skipping their exponentials leaves every output bit, statistic and provenance as is."""
    rng = np.random.default_rng(3)
    train = rng.uniform(-1, 1, (12, 1, 10, 10)).astype(np.float32)
    a, b2 = pm.schedules.cosine_legacy.scalar_coefficients(0.02)
    x = (a * train[[2, 7]] + np.sqrt(b2) * rng.standard_normal((2, 1, 10, 10))).astype(np.float32)
    lv, lp, li = ops.LabelIndex.from_labels(None).tensors()
    aa = torch.full((2,), float(a), dtype=torch.float64)
    ss = torch.full((2,), 0.5 / float(b2), dtype=torch.float64)
    knobs.block_m, knobs.block_n, knobs.count = 16, 16, True
    res = {}
    for skip in (True, False):
        knobs.skip = skip
        res[skip] = ops.local_softmax(_x(train), _x(x), aa, ss, None, None, lv, lp, li,
                                      *keysets.class_maps("els_zeros", 10, 10, 10, 10, 3), 3, True, "triton", 0, 0)
        if skip:
            counts = dict(triton_engine.tuning.last_counts)
    assert counts["skipped"] > counts["key_tiles"] // 2, counts
    for u, v in zip(res[True], res[False]):
        assert torch.equal(u, v)


@needs_triton
def test_plain_float32_products_also_hold_the_tolerance(knobs):
    knobs.split = False
    case = draw(2)
    x = queries(case, 2)
    ref = build(case, np.float64).denoise(x, case.t, case.k, labels=case.qlabels, backend="torch")
    got = build(case, np.float32).denoise(_x(x.astype(np.float32)), case.t, case.k, labels=case.qlabels,
                                          backend="triton").cpu().numpy()
    assert np.abs(got - ref).max() <= 1e-3 * RANGE and np.abs(got - ref).mean() <= 1e-5 * RANGE


@needs_triton
def test_is_with_labels_and_provenance_is_the_cpu_engines():
    rng = np.random.default_rng(5)
    train = rng.uniform(-1, 1, (9, 3, 6, 5)).astype(np.float32)
    labels = np.arange(9) % 3
    x = rng.standard_normal((4, 3, 6, 5)).astype(np.float32) * 0.5
    t, ql = np.array([0.05, 0.3, 0.6, 1.0]), np.array([2, 0, 1, 2])
    m = pm.IS(train, labels)
    got, pg = m.denoise(_x(x), t, labels=ql, backend="triton", return_provenance=True)
    ref, pr = m.denoise(x, t, labels=ql, backend="cpu", return_provenance=True)
    assert np.abs(got.cpu().numpy() - ref).max() <= 1e-5 and np.array_equal(pg.image.cpu().numpy(), pr.image)


@needs_triton
def test_opcheck_local_softmax_on_the_triton_engine():
    rng = np.random.default_rng(0)
    train = _x(rng.uniform(-1, 1, (6, 1, 5, 6)).astype(np.float32))
    x = _x(rng.standard_normal((2, 1, 5, 6)).astype(np.float32)).requires_grad_(True)
    a = torch.tensor([0.9, 0.4], dtype=torch.float64, device=DEVICE, requires_grad=True)
    s = torch.tensor([4.0, 0.6], dtype=torch.float64, device=DEVICE, requires_grad=True)
    index = [v.to(DEVICE) for v in ops.LabelIndex.from_labels(np.array([0, 1, 0, 1, 2, 2])).tensors()]
    classes = keysets.class_maps("els_zeros", 5, 6, 5, 6, 3)
    torch.library.opcheck(ops.local_softmax, (train, x, a, s, None, torch.tensor([1, 2], device=DEVICE), *index,
                                              *classes, 3, True, "triton", 0, 0))


@needs_triton
def test_the_suites_interpreter_speed_up_changes_no_bit():
    """tests/triton_cases.py's shim of the interpreter (no re-patching of triton.language inside a launch)."""
    from triton.runtime import interpreter

    cls = interpreter.InterpretedFunction
    if not triton_engine.interpreted() or not getattr(cls, "patchmosaic_fast_nested", False):
        pytest.skip("the kernels run compiled (or the shim is not installed): nothing to compare")
    case = draw(6)
    x = _x(queries(case, 6).astype(np.float32))
    m = build(case, np.float32)
    fast = m.denoise(x, case.t, case.k, labels=case.qlabels, backend="triton")
    shim = cls.__call__
    cls.__call__ = cls.patchmosaic_original_call
    try:
        slow = m.denoise(x, case.t, case.k, labels=case.qlabels, backend="triton")
    finally:
        cls.__call__ = shim
    assert torch.equal(fast, slow)


# ------------------------------------------------------------------------------------------- refusals
def test_without_triton_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(triton_engine, "available", lambda: False)
    m = pm.ELS(np.zeros((2, 1, 5, 5), np.float32))
    with pytest.raises(RuntimeError, match=re.escape('pip install "patchmosaic[gpu]"')):
        m.denoise(np.zeros((1, 1, 5, 5), np.float32), 0.5, 3, backend="triton")
    assert "triton" in ops.BACKENDS


@needs_triton
def test_cpu_tensors_outside_the_interpreter_are_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(triton_engine, "interpreted", lambda: False)
    m = pm.ELS(np.zeros((2, 1, 5, 5), np.float32))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        m.denoise(torch.zeros(1, 1, 5, 5), 0.5, 3, backend="triton")
    # float64 does not need the kernels: it runs on the CPU engine
    m64 = pm.ELS(np.zeros((2, 1, 5, 5)))
    assert torch.equal(m64.denoise(torch.zeros(1, 1, 5, 5, dtype=torch.float64), 0.5, 3, backend="triton"),
                       m64.denoise(torch.zeros(1, 1, 5, 5, dtype=torch.float64), 0.5, 3, backend="cpu"))


# ------------------------------------------------------------------------------------------ auto's table
def test_auto_follows_the_nearest_measured_shape(tmp_path, monkeypatch):
    rows = [dict(op="local", rule="els_zeros", C=1, k=3, B=1, N=60000, dtype="float32",
                 times={"cuda": 0.2, "triton": 0.05}),
            dict(op="local", rule="els_zeros", C=1, k=11, B=16, N=60000, dtype="float32",
                 times={"cuda": 4.0, "triton": 5.0}),
            dict(op="local", rule="els_circular", C=1, k=7, B=1, N=60000, dtype="float32", times={"cuda": 0.3})]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"version": 1, "devices": {"GPU X": {"rows": rows}}}))
    monkeypatch.setenv("PATCHMOSAIC_AUTO_TABLE", str(path))
    both = ("cuda", "triton", "torch")
    assert auto.choose("GPU X", "local", "els_zeros", 1, 5, 1, 50000, "float32", both) == "triton"
    assert auto.choose("GPU X", "local", "els_zeros", 1, 13, 16, 60000, "float32", both) == "cuda"
    assert auto.choose("GPU X", "local", "els_zeros", 1, 3, 1, 60000, "float32", ("cuda", "torch")) == "cuda"
    assert auto.choose("GPU X", "local", "els_circular", 1, 7, 1, 60000, "float32", both) == "cuda"
    assert auto.choose("GPU Y", "local", "els_zeros", 1, 3, 1, 60000, "float32", both) is None  # another GPU
    assert auto.choose("GPU X", "local", "els_zeros", 3, 3, 1, 60000, "float32", both) is None  # other channels
    assert auto.choose("GPU X", "ideal", None, 1, 0, 1, 60000, "float32", both) is None
    # a CPU tensor: the table is not consulted, auto is the CPU engine as before
    q = torch.zeros(1, 1, 5, 5)
    assert triton_engine.auto_choice(q, 1, ("local", "els_zeros", 3, 60000)) is None
    assert ops.library._engine(q, "auto", 1, ("local", "els_zeros", 3, 60000)) is ops.engines.CPU


def test_the_packaged_table_is_valid_json():
    table = json.load(open(auto.DEFAULT))
    assert isinstance(table.get("devices"), dict)
    for dev in table["devices"].values():
        for r in dev["rows"]:
            assert {"op", "rule", "C", "k", "B", "N", "dtype", "times"} <= set(r)


def test_a_broken_table_is_refused_with_its_path(tmp_path, monkeypatch):
    path = tmp_path / "bad.json"
    path.write_text("[1, 2]")
    monkeypatch.setenv("PATCHMOSAIC_AUTO_TABLE", str(path))
    with pytest.raises(ValueError, match="bad.json"):
        auto.table()


@needs_triton
def test_is_statistics_are_the_cpu_engines(monkeypatch):
    """IS's partial maximum is the largest logit in every engine (the Triton engine shifted it by s |x|^2 where the
    torch reference ran its backward -- a GPU without the compiled CUDA engine, simulated here: key shards on
    different engines then merged two conventions)."""
    from patchmosaic import ops
    from patchmosaic.ops import reference, triton_engine

    monkeypatch.setattr(triton_engine, "backward_engine", lambda query: reference)

    rng = np.random.default_rng(2)
    train = torch.from_numpy(rng.uniform(-1, 1, (7, 1, 4, 5)).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((3, 1, 4, 5)).astype(np.float32))
    a = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
    s = torch.tensor([3.0, 0.9, 0.2], dtype=torch.float64)
    index = ops.LabelIndex.from_labels(None).tensors()
    want = ops.ideal_softmax(train, x, a, s, None, None, *index, False, "cpu", 0, 0)[1]
    got = ops.ideal_softmax(train.to(DEVICE), x.to(DEVICE), a.to(DEVICE), s.to(DEVICE), None, None, *index, False,
                            "triton", 0, 0)[1].cpu()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
