"""FAISS patch index: the error bound holds, indexes round-trip, mismatches and corruption are refused."""

import json
import os

import numpy as np
import pytest
import torch

import patchmosaic as pm

faiss = pytest.importorskip("faiss")
from patchmosaic.patch_index import IndexedDenoiser, PatchIndex, measure_recall  # noqa: E402

F32 = 2e-5  # float32 slack: both sides are float32 softmaxes of the same keys


def _data(seed=0, N=24, C=1, H=10, W=12):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (N, C, H, W)).astype(np.float32), np.arange(N) % 3, rng


MACHINES = {
    "bbELS": lambda tr, lab: pm.ELS(tr),
    "bbELS_cond": lambda tr, lab: pm.ELS(tr, lab),
    "periodic": lambda tr, lab: pm.ELS(tr, boundary="circular"),
    "wrapped_cond": lambda tr, lab: pm.ELS(tr, lab, boundary="circular", wrapped=True),
    "LS": lambda tr, lab: pm.LS(tr, lab),
}


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_true_error_is_within_the_bound(name):
    for seed in range(3):
        tr, lab, rng = _data(seed, C=1 + 2 * (seed == 2))
        mach = MACHINES[name](tr, lab)
        labels = [0, 2] if mach.labels is not None else None
        k = [3, 5, 7][seed]
        idx = PatchIndex(mach, k, kind="flat", progress=False)
        for t in (0.02, 0.1, 0.3, 0.6, 1.0):
            x = torch.from_numpy(rng.standard_normal((2,) + tr.shape[1:]).astype(np.float32))
            exact = mach.denoise(x.double(), t, k, labels=labels)
            for m in (1, 4, 16):
                r = idx.denoise(x, t, labels, m=m)
                err = (exact - r.x0.double()).abs().amax(1)
                assert torch.all(err <= r.bound + F32), (name, seed, t, m, float((err - r.bound).max()))


def test_all_keys_retrieved_is_the_exact_machine():
    tr, lab, rng = _data(1)
    mach = pm.ELS(tr, lab)
    x = torch.from_numpy(rng.standard_normal((3, 1, 10, 12)).astype(np.float32))
    r = mach.denoise_approx(x, 0.4, 5, [0, 1, 2], m=10 ** 6)
    assert float(r.bound.max()) == 0.0
    assert torch.allclose(r.x0.double(), mach.denoise(x.double(), 0.4, 5, labels=[0, 1, 2]), atol=F32)
    prov = mach.denoise(x, 0.4, 5, labels=[0, 1, 2], return_provenance=True)[1]
    assert (r.arg_key == prov.image * 120 + prov.row * 12 + prov.col).float().mean() > 0.99


def test_save_load_round_trip_and_refusals(tmp_path):
    tr, lab, rng = _data(2)
    mach = pm.ELS(tr, lab)
    x = torch.from_numpy(rng.standard_normal((2, 1, 10, 12)).astype(np.float32))
    idx = PatchIndex(mach, 5, kind="ivf", nlist=4, nprobe=2, min_index_keys=50, progress=False)
    before = idx.denoise(x, 0.2, [1, 1], m=8)
    idx.save(str(tmp_path))
    man = json.load(open(tmp_path / "manifest.json"))
    assert man["k"] == 5 and man["kind"] == "ivf" and len(man["parts"]) == len(idx.parts)
    again = PatchIndex.load(str(tmp_path), mach, 5)
    after = again.denoise(x, 0.2, [1, 1], m=8)
    assert torch.equal(before.x0, after.x0) and torch.equal(before.bound, after.bound)

    with pytest.raises(ValueError, match="k is 5 there but 7 here"):
        PatchIndex.load(str(tmp_path), mach, 7)
    other = pm.ELS(tr + 0.01, lab)
    with pytest.raises(ValueError, match="fingerprint"):
        PatchIndex.load(str(tmp_path), other, 5)
    with pytest.raises(ValueError, match="machine is 'ELS' there but 'LS' here"):
        PatchIndex.load(str(tmp_path), pm.LS(tr, lab), 5)
    part = tmp_path / man["parts"][0]["file"]
    part.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt or unreadable index file"):
        PatchIndex.load(str(tmp_path), mach, 5)
    with pytest.raises(ValueError, match="manifest.json missing"):
        PatchIndex.load(str(tmp_path / "nothing"), mach, 5)


def test_ivf_recall_is_measured_and_exhaustive_probing_finds_everything():
    tr, lab, rng = _data(3, N=40)
    mach = pm.ELS(tr, boundary="circular")
    x = torch.from_numpy(rng.standard_normal((2, 1, 10, 12)).astype(np.float32))
    full = PatchIndex(mach, 3, kind="ivf", nlist=8, nprobe=8, min_index_keys=10, progress=False)
    assert measure_recall(full, x, 0.1, m=10, n_pixels=64) == 1.0
    some = PatchIndex(mach, 3, kind="ivf", nlist=8, nprobe=1, min_index_keys=10, progress=False)
    r = measure_recall(some, x, 0.1, m=10, n_pixels=64)
    assert 0.0 < r < 1.0
    pq = PatchIndex(mach, 3, kind="ivfpq", nlist=8, nprobe=8, pq_m=3, min_index_keys=10, progress=False)
    res = pq.denoise(x, 0.05, m=16)  # candidates from PQ codes, scores exact
    assert torch.isfinite(res.x0).all() and res.x0.abs().max() <= 1


def test_policy_uses_the_index_only_within_tolerance(tmp_path):
    tr, lab, rng = _data(4, N=30)
    mach = pm.ELS(tr)
    ks = pm.KSchedule.constant(3, 10)
    x1 = torch.randn(2, 1, 10, 12, generator=torch.Generator().manual_seed(0))
    exact = pm.ddim(pm.MachineDenoiser(mach, ks), x1, steps=10, progress=False)
    tol = 0.05  # the (M - m) exp(l_m - l_1) bound is conservative: only the last step (t = 0.1) meets it
    pol = IndexedDenoiser(mach, ks, tol=tol, m=32, cache_dir=str(tmp_path), kind="flat")
    approx = pm.ddim(pol, x1, steps=10, progress=False)
    used = [r["used"] for r in pol.record]
    assert "index" in used and "exact" in used  # high noise: bound too large; low noise: index
    for r in pol.record:
        assert (r["used"] == "index") == (r["bound_max"] <= tol)
    assert used[-1] == "index" and used.count("index") == 1
    assert float((approx - exact).abs().max()) <= pol.record[-1]["bound_max"] + F32  # the last step's bound
    assert os.path.exists(tmp_path / "k3" / "manifest.json")
    never = IndexedDenoiser(mach, ks, tol=tol, t_max=0.0)
    pm.ddim(never, x1, steps=10, progress=False)
    assert all(r["used"] == "exact" for r in never.record)


def test_bad_input():
    tr, lab, rng = _data(5)
    mach = pm.ELS(tr, lab)
    idx = PatchIndex(mach, 3, kind="flat", progress=False)
    x = torch.zeros(1, 1, 10, 12)
    with pytest.raises(TypeError, match="float32"):
        idx.denoise(x.double(), 0.5, [0])
    with pytest.raises(ValueError, match=r"\(B, 1, 10, 12\)"):
        idx.denoise(torch.zeros(1, 1, 8, 8), 0.5, [0])
    with pytest.raises(ValueError, match="m must be"):
        idx.denoise(x, 0.5, [0], m=0)
    with pytest.raises(ValueError, match="label 5 has no training images"):
        idx.denoise(x, 0.5, [5])
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        idx.denoise(x, 0.0, [0])
    with pytest.raises(ValueError, match="IS has no patches"):
        PatchIndex(pm.IS(tr), 3)
    with pytest.raises(ValueError, match="kind must be"):
        PatchIndex(mach, 3, kind="hnsw")


def test_ivf_with_many_identical_patches_still_finds_candidates():
    # mostly-blank images put thousands of identical patches into one inverted list; probing a few
    # lists can then find nothing, and the index must fall back to searching every list
    rng = np.random.default_rng(7)
    tr = np.full((60, 1, 10, 12), -1.0, np.float32)
    tr[:6] = rng.uniform(-1, 1, (6, 1, 10, 12))
    mach = pm.ELS(tr)
    idx = PatchIndex(mach, 3, kind="ivf", nlist=16, nprobe=1, min_index_keys=10, progress=False)
    x = torch.from_numpy(rng.standard_normal((2, 1, 10, 12)).astype(np.float32))
    r = idx.denoise(x, 0.1, m=8)
    assert bool((r.arg_key >= 0).all())
