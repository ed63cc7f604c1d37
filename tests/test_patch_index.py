"""FAISS patch index: the error bound holds, indexes round-trip, mismatches and corruption are refused."""

import json
import os

import numpy as np
import pytest
import torch

import patchmosaic as pm

faiss = pytest.importorskip("faiss")
from patchmosaic import IndexedDenoiser, PatchIndex
from patchmosaic.index import measure_recall  # noqa: E402

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
    r = pm.index.approx_denoise(mach, x, 0.4, 5, [0, 1, 2], m=10 ** 6)
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
    with pytest.raises(ValueError, match="not the file this index saved"):
        PatchIndex.load(str(tmp_path), mach, 5)
    _trust(tmp_path, 0, "sha256")  # past the checksum, the file itself is refused
    with pytest.raises(ValueError, match="corrupt or unreadable index file"):
        PatchIndex.load(str(tmp_path), mach, 5)
    with pytest.raises(ValueError, match="manifest.json missing"):
        PatchIndex.load(str(tmp_path / "nothing"), mach, 5)


def _trust(folder, i, key):
    """Rewrite the manifest's checksum of part i's file to the file's current one (to reach the checks
    behind the checksum)."""
    from patchmosaic.io.runstate import file_digest

    man = json.load(open(folder / "manifest.json"))
    name = man["parts"][i]["file" if key == "sha256" else "keys"]
    man["parts"][i][key] = file_digest(str(folder / name))
    json.dump(man, open(folder / "manifest.json", "w"))


def test_part_files_from_another_index_are_refused(tmp_path):
    """Part files copied in from an index of other data, under an unchanged manifest, are refused."""
    tr, lab, rng = _data(4)
    a, b = tmp_path / "a", tmp_path / "b"
    PatchIndex(pm.ELS(tr, lab), 3, kind="flat", progress=False).save(str(a))
    other = tr.copy()
    other[0] += 0.5
    PatchIndex(pm.ELS(other, lab), 3, kind="flat", progress=False).save(str(b))
    man = json.load(open(a / "manifest.json"))
    for meta in man["parts"]:
        (a / meta["file"]).write_bytes((b / meta["file"]).read_bytes())
    with pytest.raises(ValueError, match="not the file this index saved"):
        PatchIndex.load(str(a), pm.ELS(tr, lab), 3)


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


def test_step_policy_uses_the_index_only_within_tolerance(tmp_path):
    tr, lab, rng = _data(4, N=30)
    mach = pm.ELS(tr)
    ks = pm.KSchedule.constant(3, 10)
    x1 = torch.randn(2, 1, 10, 12, generator=torch.Generator().manual_seed(0))
    exact = pm.ddim(pm.MachineDenoiser(mach, ks), x1, steps=10, progress=False)
    tol = 0.05  # the (M - m) exp(l_m - l_1) bound is conservative: only the last step (t = 0.1) meets it
    pol = IndexedDenoiser(mach, ks, tol=tol, m=32, mode="step", cache_dir=str(tmp_path), kind="flat")
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


def _blank_heavy(seed=8, N=60, n_drawn=6):
    """Mostly blank images (-1) with a few random ones: thousands of identical key patches."""
    rng = np.random.default_rng(seed)
    tr = np.full((N, 1, 10, 12), -1.0, np.float32)
    tr[:n_drawn] = rng.uniform(-1, 1, (n_drawn, 1, 10, 12))
    tr[n_drawn : 2 * n_drawn, :, 3:6, 4:8] = 0.5  # the same blob in several images: duplicates that are not blank
    return tr, rng


@pytest.mark.parametrize("boundary", ["zeros", "circular"])
def test_merged_duplicates_are_exact_and_tighten_the_bound(boundary):
    tr, rng = _blank_heavy()
    lab = np.arange(len(tr)) % 2
    mach = pm.ELS(tr, lab, boundary=boundary)
    merged = PatchIndex(mach, 3, kind="flat", progress=False)
    plain = PatchIndex(mach, 3, kind="flat", merge=False, progress=False)
    for p, q in zip(merged.parts, plain.parts):
        assert p.n_total == q.n_total == len(q.keys)
        assert len(p.keys) < p.n_total and int(p.count.sum()) == p.n_total
        # every merged key's patch is bitwise the patch of the keys it stands for (brute-force check)
        vq = np.concatenate(list(plain.key_chunks(q)))
        vp = np.concatenate(list(merged.key_chunks(p)))
        _, inv = np.unique(vq, axis=0, return_inverse=True)
        _, invp = np.unique(vp, axis=0, return_inverse=True)
        assert len(np.unique(inv)) == len(p.keys) and len(np.unique(invp)) == len(p.keys)
    x = torch.from_numpy(rng.standard_normal((4, 1, 10, 12)).astype(np.float32)) * 0.3 - 0.7
    labels = [0, 1, 1, 0]
    for t in (0.05, 0.2, 0.5):
        exact = mach.denoise(x.double(), t, 3, labels=labels)
        everything = merged.denoise(x, t, labels, m=10 ** 6)
        assert float(everything.bound.max()) == 0.0
        assert float((everything.x0.double() - exact).abs().max()) <= F32
        for m in (1, 4, 16):
            r, r0 = merged.denoise(x, t, labels, m=m), plain.denoise(x, t, labels, m=m)
            err = (exact - r.x0.double()).abs().amax(1)
            assert torch.all(err <= r.bound + F32), (t, m, float((err - r.bound).max()))
            assert float(r.bound.median()) <= float(r0.bound.median())
    # with blank queries at low noise the merged blank key dominates: the bound is small where the
    # unmerged one is vacuous (the blank ties fill all m slots)
    blank = torch.full((1, 1, 10, 12), -1.0) * float(mach.schedule.coefficients(np.array([0.05]))[0][0])
    tight, loose = merged.denoise(blank, 0.05, [0], m=8), plain.denoise(blank, 0.05, [0], m=8)
    assert float(tight.bound.median()) < 1e-6 < 0.5 < float(loose.bound.median())


def test_merged_index_round_trips_and_refuses_a_bad_key_file(tmp_path):
    tr, rng = _blank_heavy(9)
    mach = pm.ELS(tr)
    idx = PatchIndex(mach, 5, kind="flat", progress=False)
    x = torch.from_numpy(rng.standard_normal((2, 1, 10, 12)).astype(np.float32))
    before = idx.denoise(x, 0.1, m=8)
    idx.save(str(tmp_path))
    after = PatchIndex.load(str(tmp_path), mach, 5).denoise(x, 0.1, m=8)
    assert torch.equal(before.x0, after.x0) and torch.equal(before.bound, after.bound)
    man = json.load(open(tmp_path / "manifest.json"))
    assert man["merge"] is True and man["parts"][0]["n_keys"] < man["parts"][0]["n_total"]
    keyfile = tmp_path / man["parts"][0]["keys"]
    good = keyfile.read_bytes()
    keyfile.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not the file this index saved"):
        PatchIndex.load(str(tmp_path), mach, 5)
    _trust(tmp_path, 0, "keys_sha256")
    with pytest.raises(ValueError, match="corrupt or unreadable key file"):
        PatchIndex.load(str(tmp_path), mach, 5)
    with np.load(tmp_path / man["parts"][1]["keys"]) as z:
        keys, count = z["keys"], z["count"]
    keyfile.write_bytes(good)
    np.savez(str(keyfile)[: -len(".npz")], keys=keys, count=count + 1)  # multiplicities that do not add up
    _trust(tmp_path, 0, "keys_sha256")
    with pytest.raises(ValueError, match="does not describe this part"):
        PatchIndex.load(str(tmp_path), mach, 5)


def test_denoise_on_selected_pixels_equals_the_full_call():
    tr, lab, rng = _data(10)
    mach = pm.ELS(tr, lab)
    x = torch.from_numpy(rng.standard_normal((3, 1, 10, 12)))
    full = mach.denoise(x, 0.3, 5, labels=[0, 1, 2])
    masks = torch.from_numpy(rng.uniform(size=(3, 10, 12)) < 0.2)
    for backend in ("cpu", "torch"):
        part = mach.denoise(x, 0.3, 5, labels=[0, 1, 2], pixels=masks, backend=backend)
        union = masks.any(0)
        assert float((part - full)[:, :, union].abs().max()) <= 1e-12  # float64: the same sums
        assert float(part[:, :, ~union].abs().max()) == 0.0
    assert float(mach.denoise(x, 0.3, 5, labels=[0, 1, 2], pixels=torch.zeros(10, 12, dtype=torch.bool)).abs().max()) == 0
    with pytest.raises(ValueError, match=r"pixels must be a boolean mask of shape \(10, 12\)"):
        mach.denoise(x, 0.3, 5, labels=[0, 1, 2], pixels=torch.ones(10, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean mask"):
        mach.denoise(x, 0.3, 5, labels=[0, 1, 2], pixels=torch.ones(10, 12))
    with pytest.raises(ValueError, match="IS machine"):
        pm.IS(tr).denoise(x, 0.3, pixels=masks)


def test_pixel_policy_keeps_every_pixel_within_tolerance():
    tr, rng = _blank_heavy(11, N=80, n_drawn=20)
    mach = pm.ELS(tr)
    ks = pm.KSchedule.constant(5, 10)
    pol = IndexedDenoiser(mach, ks, tol=1e-3, m=16, kind="flat")
    x = torch.from_numpy(rng.standard_normal((3, 1, 10, 12)).astype(np.float32)) * 0.2 - 0.8  # near blank
    x[:, :, 5:] = torch.from_numpy(rng.standard_normal((3, 1, 5, 12)).astype(np.float32))  # and plain noise
    for t in (0.05, 0.3, 0.9):
        out = pol(x, t)
        exact = mach.denoise(x.double(), t, 5)
        assert float((out.double() - exact).abs().max()) <= 1e-3 + F32
    used = [r["used"] for r in pol.record]
    fr = [r["exact_fraction"] for r in pol.record]
    assert used == ["index", "mixed", "exact"], pol.record  # low noise: index; middle: mixed; high: exact
    assert fr[0] == 0.0 and 0.0 < fr[1] < 1.0 and fr[2] == 1.0
    for r in pol.record[:2]:
        assert r["bound_max"] <= 1e-3
    with pytest.raises(ValueError, match="mode must be"):
        IndexedDenoiser(mach, ks, mode="sometimes")


def test_measured_policy_and_its_calibrated_switch_time():
    tr, rng = _blank_heavy(12, N=80, n_drawn=30)
    mach = pm.ELS(tr)
    ks = pm.KSchedule.constant(3, 10)
    x1 = torch.from_numpy(rng.standard_normal((3, 1, 10, 12)).astype(np.float32))
    exact = pm.ddim(pm.MachineDenoiser(mach, ks), x1, steps=10, progress=False)
    t_s, report = pm.calibrate_t_max(mach, ks, x1, steps=10, target_r=0.999, t_max=0.6, m=8, kind="flat")
    assert [r["t_switch"] for r in report][:1] == [0.1] and report[0]["index_steps"] == 1
    assert all(r["t_switch"] <= 0.6 for r in report)
    passed = [r["t_switch"] for r in report if r["r_min"] >= 0.999]
    assert t_s == (min(passed) if passed else 0.0)
    if t_s > 0:  # the switch time reproduces its measured agreement
        pol = IndexedDenoiser(mach, ks, m=8, t_max=t_s, mode="measured", kind="flat")
        out = pm.ddim(pol, x1, steps=10, progress=False)
        r = pm.metrics.pearson_r(exact, out)
        assert float(r.min()) >= 0.999
        assert [e["used"] for e in pol.record] == ["exact" if e["t"] > t_s + 1e-9 else "index" for e in pol.record]
    # targets that every / no switch time meets
    assert pm.calibrate_t_max(mach, ks, x1, steps=10, target_r=-1.0, t_max=0.3, m=8, kind="flat")[0] == 0.3
    assert pm.calibrate_t_max(mach, ks, x1, steps=10, target_r=1.0, m=8, kind="flat")[0] == 0.0  # (r_min < 1: 1e-8)


def test_calibrate_t_max_refuses_bad_settings_before_the_exact_trajectory(monkeypatch):
    """target_r = NaN was taken and returned the latest switch time, target_r > 1 or t_max = NaN / -3 returned 0.0
    having tried nothing, and m = 0 or an unknown index kind were refused only after the exact trajectory had been
    sampled: each is now a ValueError naming it before any sampling."""
    import patchmosaic.experiments.switch_time as st

    tr, rng = _blank_heavy(12, N=20, n_drawn=10)
    mach = pm.ELS(tr)
    x1 = torch.from_numpy(rng.standard_normal((1, 1, 10, 12)).astype(np.float32))

    def no_sampling(*a, **k):
        raise AssertionError("sampled before the settings were checked")

    monkeypatch.setattr(st, "ddim", no_sampling)
    for kw, msg in ((dict(target_r=float("nan")), r"target_r must be a number in \[-1, 1\], got nan"),
                    (dict(target_r=1.5), r"target_r .* got 1.5"), (dict(target_r="0.9"), r"target_r .* got '0.9'"),
                    (dict(t_max=float("nan")), r"t_max must be a number in \[0, 1\], got nan"),
                    (dict(t_max=-3.0), r"t_max .* got -3.0"), (dict(m=0), r"\bm\b"), (dict(kind="nope"), "nope")):
        with pytest.raises(ValueError, match=msg):
            pm.calibrate_t_max(mach, 3, x1, steps=4, **kw)


def test_ivf_bound_is_flagged_conditional_and_a_retrieval_failure_is_caught():
    """Pure-noise queries against an IVF index probing 1 of 16 lists: nearer keys sit in unprobed lists and
    the bound (~0) is wrong on many pixels. The result says the bound is conditional, the sampled exact
    check finds failures, flags the bound invalid and warns; a flat index's bound is unconditional."""
    images = pm.data.load_default()[0][:300]
    mach = pm.ELS(images)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    ivf = PatchIndex(mach, 5, kind="ivf", nlist=16, nprobe=1, min_index_keys=10, progress=False)
    with pytest.warns(pm.index.RetrievalWarning, match="retrieval failed on"):
        res = ivf.denoise(x, 0.1, m=16, check_pixels=128)
    exact = mach.denoise(x, 0.1, 5)
    truly_failed = ((exact - res.x0).abs().amax(1) > res.bound + 1e-4 * 2)
    assert truly_failed.float().mean() > 0.05  # the example is one where retrieval does fail
    assert res.bound_conditional and res.checked_pixels == 128 and res.failed_pixels > 0
    assert res.bound_valid is False and res.worst_excess > 0.05
    unchecked = ivf.denoise(x, 0.1, m=16, check_pixels=0)
    assert unchecked.bound_conditional and unchecked.bound_valid is None and unchecked.checked_pixels == 0
    flat = PatchIndex(mach, 5, kind="flat", progress=False).denoise(x, 0.1, m=16)
    assert not flat.bound_conditional and flat.bound_valid is True and flat.checked_pixels == 0


def test_ivf_retrieval_check_passes_where_retrieval_is_exhaustive_and_policies_fall_back():
    tr, lab, rng = _data(5)
    mach = pm.ELS(tr)
    x = torch.from_numpy(rng.standard_normal((2, 1, 10, 12)).astype(np.float32))
    full = PatchIndex(mach, 3, kind="ivf", nlist=4, nprobe=4, min_index_keys=10, progress=False)
    res = full.denoise(x, 0.3, m=32)
    assert res.bound_conditional and res.bound_valid is True and res.failed_pixels == 0
    # a policy whose index fails the check computes the step exactly (and records why)
    images = pm.data.load_default()[0][:300]
    big = pm.ELS(images)
    pol = IndexedDenoiser(big, 5, tol=1e-3, m=16, kind="ivf", nlist=16, nprobe=1, min_index_keys=10)
    xn = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.warns(pm.index.RetrievalWarning):
        out = pol(xn, 0.1)
    assert pol.record[-1]["used"] == "exact" and "retrieval_failed" in pol.record[-1]
    assert torch.allclose(out, big.denoise(xn, 0.1, 5), atol=1e-6)


def test_index_settings_out_of_range_are_refused():
    """Issue 28 campaign: nprobe=0, pq_m=0, nlist=0, min_index_keys=-1, m=2.5, check_pixels=-1 and an
    IndexedDenoiser's max_exact_fraction=2 were accepted without a word."""
    rng = np.random.default_rng(5)
    m = pm.ELS(rng.uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32))
    for kw, name in ((dict(nprobe=0), "nprobe"), (dict(pq_m=0), "pq_m"), (dict(nlist=0), "nlist"),
                     (dict(nprobe=2.5), "nprobe"), (dict(min_index_keys=-1), "min_index_keys"),
                     (dict(merge="yes"), "merge"), (dict(flat_budget=-1), "flat_budget")):
        with pytest.raises(ValueError, match=name):
            pm.PatchIndex(m, 3, progress=False, **kw)
    idx = pm.PatchIndex(m, 3, kind="flat", progress=False)
    x = np.zeros((1, 1, 8, 8), np.float32)
    for kw, name in ((dict(m=2.5), "m must be"), (dict(m=True), "m must be"), (dict(check_pixels=-1), "check_pixels")):
        with pytest.raises(ValueError, match=name):
            idx.denoise(x, 0.5, **kw)
    for kw, name in ((dict(max_exact_fraction=2), "max_exact_fraction"), (dict(m=0), "m must be"),
                     (dict(t_max=1.5), "t_max"), (dict(tol=float("nan")), "tol")):
        with pytest.raises(ValueError, match=name):
            pm.IndexedDenoiser(m, 3, **kw)


def test_a_loaded_index_keeps_each_parts_kind_and_checks_an_inverted_file_bound(tmp_path):
    # the parts' kinds come from the saved FAISS files, not from the default min_index_keys: a loaded IVF part's
    # bound stays conditional on retrieval and is checked (it was called exact, and unchecked, before)
    tr, lab, rng = _data(0, N=40)
    mach = pm.ELS(tr)
    idx = PatchIndex(mach, 5, kind="ivf", nlist=16, nprobe=1, min_index_keys=50, progress=False)
    kinds = [idx.part_kind(p) for p in idx.parts]
    assert "ivf" in kinds
    idx.save(str(tmp_path / "i"))
    back = PatchIndex.load(str(tmp_path / "i"), mach, 5)
    assert [back.part_kind(p) for p in back.parts] == kinds
    x = torch.from_numpy(rng.standard_normal((2, 1, 10, 12)).astype(np.float32))
    with pytest.warns(pm.index.RetrievalWarning):
        r = back.denoise(x, 0.3, m=8)
    assert r.bound_conditional and r.checked_pixels == 64 and r.bound_valid is False
    # saved again and reloaded: the same kinds (an IVF-PQ part re-saved as flat could not be read back)
    pq = PatchIndex(mach, 5, kind="ivfpq", nlist=4, pq_m=5, min_index_keys=300, progress=False)
    pq.save(str(tmp_path / "pq"))
    again = PatchIndex.load(str(tmp_path / "pq"), mach, 5)
    again.save(str(tmp_path / "pq2"))
    twice = PatchIndex.load(str(tmp_path / "pq2"), mach, 5)
    assert [twice.part_kind(p) for p in twice.parts] == [pq.part_kind(p) for p in pq.parts]
    assert "ivfpq" in [twice.part_kind(p) for p in twice.parts]


def test_open_checks_the_build_settings_asked_for_and_takes_the_search_setting(tmp_path):
    tr, lab, rng = _data(0, N=40)
    mach = pm.ELS(tr)
    folder = str(tmp_path / "k5")
    PatchIndex.open(folder, mach, 5, kind="ivf", nlist=16, nprobe=1, min_index_keys=50, progress=False)
    for name, value in (("kind", "flat"), ("nlist", 8), ("min_index_keys", 100), ("merge", False)):
        with pytest.raises(ValueError, match=f"built with {name}=.*not the {name}="):
            PatchIndex.open(folder, mach, 5, **{name: value})
    idx = PatchIndex.open(folder, mach, 5, kind="auto", nprobe=16)
    assert idx.nprobe == 16 and idx.kind == "ivf"
    assert all(p.index.nprobe == min(16, p.index.nlist) for p in idx.parts if idx.part_kind(p) == "ivf")
    den = IndexedDenoiser(mach, 5, cache_dir=str(tmp_path), kind="flat")
    with pytest.raises(ValueError, match="built with kind='ivf'"):
        den.index(5)
    # an index saved before the manifest recorded min_index_keys: that setting cannot be checked, the others are
    man_path = tmp_path / "k5" / "manifest.json"
    man = json.loads(man_path.read_text())
    del man["min_index_keys"]
    man_path.write_text(json.dumps(man))
    assert PatchIndex.open(folder, mach, 5, kind="ivf", nlist=16, min_index_keys=50).kind == "ivf"
    with pytest.raises(ValueError, match="built with nlist=16, not the nlist=8"):
        PatchIndex.open(folder, mach, 5, nlist=8, min_index_keys=50)


def test_the_index_keeps_its_own_copy_of_the_mask_and_equal_masks_share_a_cached_index():
    tr, lab, rng = _data(0)
    mach = pm.ELS(tr)
    x = torch.from_numpy(rng.standard_normal((2, 1, 10, 12)).astype(np.float32))
    w = torch.ones(5, 5, dtype=torch.float64)
    w[0, 0] = 0
    idx = PatchIndex(mach, 5, kind="flat", progress=False, patch_mask=w)
    before = idx.denoise(x, 0.2, m=4)
    w[:] = 0
    w[2, 2] = 1  # the caller reuses its tensor
    after = idx.denoise(x, 0.2, m=4)
    assert torch.equal(before.x0, after.x0) and torch.equal(before.bound, after.bound)
    assert idx.manifest()["patch_mask"][0][0] == 0.0 and idx.manifest()["patch_mask"][0][1] == 1.0
    mask = np.ones((5, 5), bool)
    mask[0] = False
    outs = [pm.index.approx_denoise(mach, x, 0.3, 5, m=4, kind="flat", patch_mask=m_)
            for m_ in (mask, torch.from_numpy(mask), mask.tolist())]
    assert all(torch.equal(o.x0, outs[0].x0) for o in outs)
    from patchmosaic.index.cache import cached_index
    assert cached_index(mach, 5, (10, 12), kind="flat", patch_mask=mask) is \
        cached_index(mach, 5, (10, 12), kind="flat", patch_mask=torch.from_numpy(mask.copy()))


def test_a_conditional_index_asks_for_labels_and_flat_budget_is_checked_before_work():
    tr, lab, rng = _data(0)
    mach = pm.ELS(tr, lab)
    idx = PatchIndex(mach, 5, kind="flat", progress=False)
    x = torch.from_numpy(rng.standard_normal((2, 1, 10, 12)).astype(np.float32))
    with pytest.raises(ValueError, match="class-conditional.*pass labels"):
        idx.denoise(x, 0.3)
    for kind, budget in (("auto", -1), ("ivf", "lots"), ("flat", -5), ("ivfpq", 1.5)):
        with pytest.raises(ValueError, match="flat_budget"):
            PatchIndex(mach, 5, kind=kind, flat_budget=budget, progress=False)


def test_the_bound_allows_for_faiss_float32_ranking_of_near_ties():
    # two +-1 images, m = 1 of M = 2 keys per pixel, queries at their midpoint: the two keys' distances differ
    # below float32's resolution, which at low noise is a large difference of logits; FAISS may return the
    # farther key, and the bound must cover that (it said R / 2 = 1 where the error was 1.13)
    rng = np.random.default_rng(1)
    tr = np.where(rng.random((2, 1, 16, 16)) < 0.5, -1.0, 1.0).astype(np.float32)
    mach = pm.LS(tr)
    idx = PatchIndex(mach, 15, kind="flat", progress=False)
    worst = -np.inf
    for t in (0.05, 0.01, 0.003, 0.001):
        a = float(mach.schedule.coefficients(np.array([t]))[0][0])
        for sigma in (1e-3, 1e-4, 1e-5):
            x = torch.from_numpy((a * (tr[0:1] + tr[1:2]) / 2 + sigma * rng.standard_normal((4, 1, 16, 16)))
                                 .astype(np.float32))
            r = idx.denoise(x, t, m=1)
            err = (mach.denoise(x.double(), t, 15) - r.x0.double()).abs().amax(1)
            worst = max(worst, float((err - r.bound).max()))
    assert worst <= F32, worst
