"""Hostile input, interrupted runs and output files: a clear error (ValueError / TypeError /
pm.ResourceError in the API, exit 2 and one line at the CLI) before any heavy work, or a correct result;
never a crash, a hang, a silent NaN or a silent mix-up. One test per case found by a hostile user (issue
14), plus the cases that already held (NaN, malicious pickles, kill -9 and resume, thread counts), and a
property-based test that throws random shapes, dtypes, k, t and labels at every machine and backend."""

import gzip
import json
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patchmosaic as pm
from patchmosaic.experiments.cli import main

from cases import MachineNet
from conftest import scripted

RNG = np.random.default_rng(14)
IMGS = RNG.uniform(-1, 1, (40, 1, 12, 12)).astype(np.float32)


def cli(capsys, *argv):
    """Exit code and stderr of a CLI call (an argparse error included); a failure must be one line."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own exit, on a bad option value
        code = e.code
    err = capsys.readouterr().err.strip()
    if code:
        assert code == 2 and err.count("\n") == 0 and err.startswith("patchmosaic"), err
    return code, err


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=RNG.integers(0, 256, (40, 8, 8), dtype=np.uint8), y_train=np.arange(40) % 4)
    return str(path)


# ------------------------------------------------------------------------ 1. patch sizes without bound
def test_huge_k_is_computed_at_its_exact_equivalent_size():
    """With zero padding a patch beyond 2 max(H, W) - 1 only adds zeros: k = 10001 or 65537 (which used to
    abort or segfault) give the k = 23 result, in the time of k = 23."""
    m = pm.ELS(IMGS)
    x = torch.from_numpy(RNG.standard_normal((2, 1, 12, 12)).astype(np.float32))
    ref = m.denoise(x, 0.5, 23)
    for k in (25, 10001, 65537):
        t0 = time.perf_counter()
        assert torch.equal(m.denoise(x, 0.5, k), ref)
        assert time.perf_counter() - t0 < 30
    assert torch.allclose(m.denoise(x.double(), 0.5, 101, backend="torch"), m.denoise(x.double(), 0.5, 23), atol=1e-12)
    assert torch.equal(pm.LS(IMGS).denoise(x, 0.5, 10001), pm.LS(IMGS).denoise(x, 0.5, 23))


def test_huge_k_refused_where_it_is_not_equivalent():
    x = torch.zeros(1, 1, 12, 12)
    with pytest.raises(ValueError, match="wraps around the images more than once.*k <= 25"):
        pm.ELS(IMGS, boundary="circular", wrapped=True).denoise(x, 0.5, 10001)
    with pytest.raises(ValueError, match="wraps around the images more than once"):
        pm.ELS(IMGS, boundary="circular").denoise(x, 0.5, 10001)
    with pytest.raises(ValueError, match="fully-inside"):
        pm.ELS(IMGS, boundary="circular").denoise(x, 0.5, 15)
    pytest.importorskip("faiss")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="larger than any useful one"):
        pm.PatchIndex(pm.ELS(IMGS), 10001, progress=False)
    assert time.perf_counter() - t0 < 5


def test_the_compiled_core_refuses_sizes_that_overflow():
    from patchmosaic import _core
    from patchmosaic.machines.keysets import keyset
    from patchmosaic.ops import contract
    from patchmosaic.ops.labels import Groups

    ks = keyset("els_zeros", 6, 6, 6, 6, 3)
    g = Groups(np.array([0, 4], np.int64), np.arange(4, dtype=np.int32), np.zeros(1, np.int32))
    train, q, out = torch.zeros(4, 1, 6, 6), torch.zeros(1, 1, 6, 6), torch.zeros(1, 1, 6, 6)
    a, stats = torch.ones(1, dtype=torch.float64), torch.zeros(1, 6, 6, 2, dtype=torch.float64)
    c = contract.local_call(_core, train=train, query=q, k=3, keyset=ks, a=a, inv_2b2=a, groups=g, out=out,
                            stats=stats)
    c.k = 65537
    with pytest.raises(ValueError, match="patch size k=65537"):
        _core.local_forward_cpu(c)
    c.k, c.C = 10001, 1 << 20
    with pytest.raises(ValueError):
        _core.local_forward_cpu(c)


def test_cli_with_huge_k(tmp_path, tiny, capsys):
    out = str(tmp_path / "s.png")
    code, _ = cli(capsys, "sample", "--data", tiny, "--k", "10001", "--n", "1", "--steps", "2", "--out", out, "--quiet")
    assert code == 0 and os.path.exists(out)
    net = str(tmp_path / "net")
    assert main(["train", "--data", tiny, "--width", "4", "--depth", "1", "--steps", "1", "--out", net, "--quiet"]) == 0
    t0 = time.perf_counter()
    code, err = cli(capsys, "calibrate", "--network", net, "--data", tiny, "--k-max", "100001", "--seeds", "1",
                    "--out", str(tmp_path / "k.json"), "--quiet")
    assert code == 2 and "larger than any useful one" in err and time.perf_counter() - t0 < 20


# ----------------------------------------------------------------- 2. resume fingerprints cover content
def test_calibration_state_of_other_training_images_is_refused(tmp_path):
    from patchmosaic.experiments.calibrate import calibrate

    a, b = pm.ELS(IMGS), pm.ELS(IMGS[::-1].copy())  # the same size, other content
    x1 = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    state = str(tmp_path / "cal.npz")
    calibrate(MachineNet(a, 5), a, x1, candidates=(3, 5), steps=3, state=state, progress=False)
    with pytest.raises(ValueError, match="different run"):
        calibrate(MachineNet(a, 5), b, x1, candidates=(3, 5), steps=3, state=state, progress=False)
    other = torch.nn.Linear(1, 1)  # another network (other weights) for the same machine
    net = MachineNet(a, 5)
    net.extra = other
    with pytest.raises(ValueError, match="different run"):
        calibrate(net, a, x1, candidates=(3, 5), steps=3, state=state, progress=False)


def test_compare_directory_of_other_training_images_is_refused(tmp_path):
    from patchmosaic.experiments.compare import compare

    x1 = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    a, b = pm.ELS(IMGS), pm.ELS(IMGS[::-1].copy())
    out = str(tmp_path / "cmp")
    compare(MachineNet(a, 5), {"ELS": pm.MachineDenoiser(a, 5)}, x1, steps=3, out_dir=out, progress=False)
    with pytest.raises(ValueError, match="different run"):
        compare(MachineNet(a, 5), {"ELS": pm.MachineDenoiser(b, 5)}, x1, steps=3, out_dir=out, progress=False)


def test_index_part_files_of_other_data_are_refused(tmp_path):
    pytest.importorskip("faiss")
    a, b = tmp_path / "a", tmp_path / "b"
    pm.PatchIndex(pm.ELS(IMGS), 3, kind="flat", progress=False).save(str(a))
    pm.PatchIndex(pm.ELS(IMGS[::-1].copy()), 3, kind="flat", progress=False).save(str(b))
    for meta in json.load(open(a / "manifest.json"))["parts"]:
        for key in ("file", "keys"):
            (a / meta[key]).write_bytes((b / meta[key]).read_bytes())
    with pytest.raises(ValueError, match="not the file this index saved"):
        pm.PatchIndex.load(str(a), pm.ELS(IMGS), 3)


# ------------------------------------------------------------------------- 3. large finite values
@pytest.mark.parametrize("kind", ["IS", "LS", "ELS"])
def test_values_too_large_for_the_type_are_refused_not_nan(kind):
    make = {"IS": pm.IS, "LS": pm.LS, "ELS": pm.ELS}[kind]
    x = RNG.standard_normal((1, 1, 12, 12))
    with pytest.raises(ValueError, match="too large for float32"):
        make(IMGS * np.float32(1e19)).denoise(x.astype(np.float32), 0.5, 3)
    with pytest.raises(ValueError, match="too large for float32"):
        make(IMGS).denoise(np.full((1, 1, 12, 12), 3.4e38, np.float32), 0.5, 3)
    with pytest.raises(ValueError, match="too large for float64"):
        make(IMGS.astype(np.float64) * 1e155).denoise(x, 0.5, 3)


@pytest.mark.parametrize("kind", ["IS", "LS", "ELS"])
def test_large_values_within_the_types_range_compute_correctly(kind):
    make = {"IS": pm.IS, "LS": pm.LS, "ELS": pm.ELS}[kind]
    for dtype, scale in ((np.float32, 1e11), (np.float64, 1e140)):
        tr = IMGS.astype(np.float64) * scale
        x = (0.4 * tr[:2] + 0.9 * scale * RNG.standard_normal((2, 1, 12, 12)))
        got = make(tr.astype(dtype)).denoise(x.astype(dtype), 1.0, 3)
        ref = make(tr).denoise(x, 1.0, 3, backend="torch")  # the float64 oracle at the same scale
        assert np.all(np.isfinite(got)) and np.all(np.isfinite(ref))
        assert np.abs(got - ref).max() <= (1e-3 if dtype == np.float32 else 1e-9) * 2 * scale  # (of the range)


# --------------------------------------------------------------------------------- 4. npz channels
def test_npz_with_an_alpha_channel_is_refused(tmp_path):
    for c in (4, 2):
        path = tmp_path / f"rgba{c}.npz"
        np.savez(path, x_train=RNG.integers(0, 256, (5, 32, 32, c), dtype=np.uint8))
        with pytest.raises(ValueError, match=f"{c} channels.*alpha"):
            pm.data.load(str(path))
    path = tmp_path / "rgb.npz"
    np.savez(path, x_train=RNG.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    assert tuple(pm.data.load(str(path))[0].shape) == (5, 3, 32, 32)


# ----------------------------------------------------------------------------------- 5. output files
def test_outputs_write_through_symlinks_refuse_special_files_and_use_the_umask(tmp_path):
    from patchmosaic.io.files import write_bytes, write_json
    from patchmosaic.io.images import write_png

    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json(str(link), {"a": 1})
    assert link.is_symlink() and json.load(open(target)) == {"a": 1}
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="named pipe"):
        write_png(str(fifo), np.zeros((2, 2, 3), np.uint8))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(ValueError, match="device"):
        write_bytes("/dev/null", b"x")
    with pytest.raises(ValueError, match="directory"):
        write_bytes(str(tmp_path), b"x")
    old = os.umask(0o027)
    try:
        write_bytes(str(tmp_path / "new.bin"), b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.bin").st_mode) == 0o640
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left


def test_cli_refuses_a_device_as_output(tmp_path, tiny, capsys):
    code, err = cli(capsys, "sample", "--data", tiny, "--k", "3", "--n", "1", "--steps", "1", "--out", "/dev/null",
                    "--quiet")
    assert code == 2 and "device" in err


# --------------------------------------------------------------------------- 6. every CLI error: exit 2
def test_cli_bad_files_exit_2_with_one_line(tmp_path, tiny, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert "bad.npz" in cli(capsys, "sample", "--data", str(bad), "--out", str(tmp_path / "o.png"))[1]
    raw = gzip.compress(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(7840))
    idx = tmp_path / "train-images-idx3-ubyte.gz"
    idx.write_bytes(raw[: len(raw) // 2])
    assert "train-images-idx3-ubyte.gz" in cli(capsys, "sample", "--data", str(idx), "--out", str(tmp_path / "o.png"))[1]
    d = tmp_path / "cifar"
    d.mkdir()
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": RNG.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1]}, f)
    assert "4 images but 2 labels" in cli(capsys, "sample", "--data", str(d), "--out", str(tmp_path / "o.png"))[1]
    ks = tmp_path / "ks.json"
    ks.write_text(json.dumps({"times": [1.0]}))
    assert "ks.json" in cli(capsys, "sample", "--data", tiny, "--k", str(ks), "--out", str(tmp_path / "o.png"))[1]
    net = tmp_path / "net"
    net.mkdir()
    (net / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert "safetensors" in cli(capsys, "compare", "--network", str(net), "--data", tiny, "--machine", "els=3",
                                "--out", str(tmp_path / "c"))[1]
    code, err = cli(capsys, "sample", "--data", tiny, "--canvas", "100000x100000", "--k", "3", "--out",
                    str(tmp_path / "o.png"))
    assert code == 2 and "GiB" in err


# -------------------------------------------------------------------------------- 7. oversized requests
def test_oversized_requests_are_refused_up_front(tmp_path, tiny, capsys):
    m = pm.ELS(IMGS)
    for shape in ((1, 1, 100000, 100000), (1, 1, 20000, 20000), (400000, 1, 32, 32), (1 << 40, 1, 8, 8)):
        t0 = time.perf_counter()
        with pytest.raises(pm.ResourceError, match="GiB of working memory"):
            m.check_request(shape, torch.float32, "cpu", k=7)
        assert time.perf_counter() - t0 < 1
    t0 = time.perf_counter()
    code, err = cli(capsys, "sample", "--data", tiny, "--canvas", "20000x20000", "--k", "3", "--out",
                    str(tmp_path / "o.png"))
    assert code == 2 and "GiB" in err and time.perf_counter() - t0 < 10
    x = torch.zeros(400000, 1, 12, 12)
    t0 = time.perf_counter()
    with pytest.raises(pm.ResourceError):
        pm.ELS(IMGS, max_memory=1 << 30).denoise(x, 0.5, 3)
    assert time.perf_counter() - t0 < 2


# ------------------------------------------------------------------------------- 8. training runs
def test_train_seed_is_reproducible_and_resume_keeps_its_settings(tmp_path):
    from safetensors.torch import load_file

    from patchmosaic.networks import TrainConfig, train

    x = torch.from_numpy(IMGS[:16, :, :8, :8])
    cfg = {"arch": "resnet", "channels": 1, "width": 4, "depth": 1, "padding": "zeros", "num_classes": 0}
    for run in ("a", "b"):
        train(dict(cfg), x, out=str(tmp_path / run), config=TrainConfig(steps=3, batch_size=4, seed=5), progress=False)
    wa, wb = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match=r"lr=0.001 \(it was trained with 0.0002\).*override"):
        train(dict(cfg), x, out=str(tmp_path / "a"), config=TrainConfig(steps=5, batch_size=4, seed=5, lr=1e-3),
              progress=False)
    train(dict(cfg), x, out=str(tmp_path / "a"), config=TrainConfig(steps=5, batch_size=4, seed=5, lr=1e-3),
          progress=False, override=True)
    info = json.load(open(tmp_path / "a" / "config.json"))["info"]
    hist = info["train"]["history"]
    assert [h["from_step"] for h in hist] == [0, 3] and hist[0]["config"]["lr"] == 2e-4 and hist[1]["config"]["lr"] == 1e-3


def test_train_with_a_new_seed_on_resume_reseeds_from_the_checkpoint(tmp_path):
    """An overriding seed was recorded in the history but the run went on with the checkpoint's generator state:
    the same weights as without it. The new seed now draws the data order and noise from the checkpoint's step on."""
    import shutil

    from patchmosaic.networks import TrainConfig, load, train

    x = torch.from_numpy(IMGS[:16, :, :8, :8])
    cfg = {"arch": "resnet", "channels": 1, "width": 4, "depth": 1, "padding": "zeros", "num_classes": 0}
    tc = dict(batch_size=4, lr=1e-3, ema_decay=0, checkpoint_every=3)
    train(dict(cfg), x, out=str(tmp_path / "a"), config=TrainConfig(steps=3, seed=1, **tc), progress=False)
    for run in ("b", "c"):
        shutil.copytree(tmp_path / "a", tmp_path / run)
    old = train(dict(cfg), x, out=str(tmp_path / "a"), config=TrainConfig(steps=6, seed=1, **tc), progress=False)
    new = [train(dict(cfg), x, out=str(tmp_path / run), config=TrainConfig(steps=6, seed=2, **tc), progress=False,
                 override=True) for run in ("b", "c")]
    hist = load(str(tmp_path / "b"))[1]["train"]["history"]
    assert [(h["from_step"], h["config"]["seed"]) for h in hist] == [(0, 1), (3, 2)]
    assert any(not torch.equal(p, q) for p, q in zip(old.state_dict().values(), new[0].state_dict().values()))
    assert all(torch.equal(p, q) for p, q in zip(new[0].state_dict().values(), new[1].state_dict().values()))


# --------------------------------------------------------------------------------------- 9. smaller
def test_network_outputs_of_the_wrong_shape_or_nan_are_refused():
    x = torch.zeros(2, 1, 12, 12)
    with pytest.raises(ValueError, match="returned Tensor of shape \\(1, 1, 12, 12\\)"):
        pm.NetworkDenoiser(lambda t, x, y: torch.zeros(1, 1, 12, 12)).eps(x, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        pm.NetworkDenoiser(lambda t, x, y: torch.full_like(x, float("nan"))).eps(x, 0.5)


def test_compare_with_a_nan_network_is_an_error(tmp_path, tiny, capsys):
    from patchmosaic.networks import ResNet, save

    net = ResNet(channels=1, width=4, depth=1)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float("nan"))
    save(str(tmp_path / "nan"), net)
    code, err = cli(capsys, "compare", "--network", str(tmp_path / "nan"), "--data", tiny, "--seeds", "2",
                    "--steps", "2", "--machine", "els=3", "--out", str(tmp_path / "c"), "--quiet")
    assert code == 2 and "NaN" in err


def test_schedule_callable_returning_a_scalar_says_so():
    with pytest.raises(ValueError, match="one alpha_bar per time"):
        pm.ELS(IMGS, schedule=lambda t: 0.5).denoise(np.zeros((1, 1, 12, 12), np.float32), 0.3, 3)


def test_cifar_float_data_and_out_of_range_labels_are_refused(tmp_path):
    for name, data, labels, match in (("f", RNG.uniform(0, 255, (2, 3072)), [0, 1], "uint8"),
                                      ("neg", RNG.integers(0, 256, (2, 3072), dtype=np.uint8), [0, -1], "labels"),
                                      ("big", RNG.integers(0, 256, (2, 3072), dtype=np.uint8), [0, 2 ** 40], "labels")):
        d = tmp_path / name
        d.mkdir()
        with open(d / "data_batch_1", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        with pytest.raises(ValueError, match=match):
            pm.data.load(str(d))


def test_kschedule_entries_must_be_integers(tmp_path):
    for ks in ([7.9], ["7"], [True]):
        p = tmp_path / "k.json"
        p.write_text(json.dumps({"times": [1.0], "ks": ks}))
        with pytest.raises(ValueError, match="odd integer"):
            pm.KSchedule.from_json(str(p))
    with pytest.raises(ValueError, match="odd positive integer"):
        pm.KSchedule((1.0,), (7.0,))


def test_idx_of_dimension_zero_is_refused(tmp_path):
    p = tmp_path / "zero-idx"
    p.write_bytes(b"\x00\x00\x08\x00\x07")
    with pytest.raises(ValueError, match="not images"):
        pm.data.load(str(p))


@pytest.mark.parametrize("t", ["0.5", True, b"0.5"])
def test_t_of_the_wrong_type_is_a_type_error(t):
    with pytest.raises(TypeError, match="t must be"):
        pm.ELS(IMGS).denoise(np.zeros((1, 1, 12, 12), np.float32), t, 3)


def test_colliding_machine_names_are_refused():
    from patchmosaic.experiments.compare import compare

    m = pm.MachineDenoiser(pm.ELS(IMGS), 3)
    x1 = torch.zeros(1, 1, 12, 12)
    with pytest.raises(ValueError, match="'a/b' and 'a_b' would share"):
        compare(MachineNet(pm.ELS(IMGS), 3), {"a/b": m, "a_b": m}, x1, steps=2, progress=False, out_dir="unused")
    with pytest.raises(ValueError, match="'network' names the network"):
        compare(MachineNet(pm.ELS(IMGS), 3), {"network": m}, x1, steps=2, progress=False)


# ------------------------------------------------------------------------------ what already held
def test_nan_and_inf_are_refused():
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((1, 1, 12, 12), np.float32)
        x[0, 0, 3, 3] = bad
        for m in (pm.ELS(IMGS), pm.IS(IMGS)):
            with pytest.raises(ValueError, match="NaN or infinite"):
                m.denoise(x, 0.5, 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        pm.ELS(np.where(IMGS > 0.9, np.nan, IMGS))


def test_malicious_cifar_pickle_does_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        pm.data.load(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_thread_counts_and_concurrent_threads_give_the_same_bits():
    x = RNG.standard_normal((3, 1, 12, 12)).astype(np.float32)
    ref = pm.ELS(IMGS, n_threads=1).denoise(x, 0.4, 5)
    assert np.array_equal(pm.ELS(IMGS, n_threads=2).denoise(x, 0.4, 5), ref)
    m = pm.ELS(IMGS)
    outs = [None] * 4

    def work(i):
        outs[i] = m.denoise(x, 0.4, 5)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(np.array_equal(o, ref) for o in outs)


@pytest.mark.parametrize("command", ["calibrate", "compare"])
def test_kill_9_and_resume_gives_the_same_bits(tmp_path, command):
    """A run killed with SIGKILL mid-way and rerun with the same arguments ends with the same output as an
    uninterrupted run."""
    data = tmp_path / "d.npz"
    np.savez(data, x_train=RNG.integers(0, 256, (30, 8, 8), dtype=np.uint8), y_train=np.arange(30) % 3)
    net = tmp_path / "net"
    assert main(["train", "--data", str(data), "--width", "4", "--depth", "1", "--steps", "2", "--out", str(net),
                 "--quiet"]) == 0

    def argv(out):
        base = ["--network", str(net), "--data", str(data), "--seeds", "6", "--steps", "10", "--quiet"]
        if command == "calibrate":
            return [command] + base + ["--candidates", "3,5", "--out", str(out)]
        return [command] + base + ["--machine", "els=7", "--batch", "2", "--out", str(out)]

    ref = tmp_path / ("ref.json" if command == "calibrate" else "ref")
    assert main(argv(ref)) == 0
    out = tmp_path / ("run.json" if command == "calibrate" else "run")
    state = str(out) + ".state.npz" if command == "calibrate" else os.path.join(out, "samples_els_7.npz")
    proc = subprocess.Popen([sys.executable, "-m", "patchmosaic"] + argv(out), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(state) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = proc.returncode == -signal.SIGKILL
    assert main(argv(out)) == 0
    if command == "calibrate":
        assert json.load(open(out))["cosine"] == json.load(open(ref))["cosine"]
    else:
        got = np.load(os.path.join(out, "samples_els_7.npz"))["samples"]
        assert np.array_equal(got, np.load(os.path.join(ref, "samples_els_7.npz"))["samples"])
    assert interrupted, "the run ended before it could be killed: make it longer"


# ------------------------------------------------------------------------------ property-based
KINDS = {"IS": lambda tr, lab: pm.IS(tr, lab), "LS": lambda tr, lab: pm.LS(tr, lab),
         "ELS": lambda tr, lab: pm.ELS(tr, lab), "ELS_circular": lambda tr, lab: pm.ELS(tr, lab, boundary="circular"),
         "ELS_wrapped": lambda tr, lab: pm.ELS(tr, lab, boundary="circular", wrapped=True)}
CLEAR = (ValueError, TypeError)  # pm.ResourceError is a ValueError


def mostly(good, bad):
    """Valid values three times in four, so that most examples reach the engines."""
    return st.one_of(good, good, good, bad)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(KINDS)), backend=st.sampled_from(["cpu", "torch"]),
       N=st.integers(1, 4), C=st.sampled_from([1, 3]), H=st.integers(1, 7), W=st.integers(1, 7),
       B=st.integers(1, 3), dq=mostly(st.just(0), st.integers(-1, 3)),
       dtype=mostly(st.sampled_from(["float32", "float64"]), st.sampled_from(["float16", "int64", "complex64"])),
       k=mostly(st.integers(0, 8).map(lambda i: 2 * i + 1),
                st.one_of(st.none(), st.integers(-3, 40), st.sampled_from([3.0, "3", True, 10 ** 6 + 1]))),
       t=mostly(st.floats(1e-4, 1.0), st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                                st.sampled_from(["0.5", None]))),
       conditional=st.booleans(), label=mostly(st.integers(0, 1), st.integers(-2, 4)), seed=st.integers(0, 1000))
def test_any_input_gives_a_clear_error_or_a_finite_result(kind, backend, N, C, H, W, B, dq, dtype, k, t, conditional,
                                                          label, seed):
    rng = np.random.default_rng(seed)
    train = rng.uniform(-1, 1, (N, C, H, W))
    labels = np.arange(N) % 2 if conditional else None
    m = KINDS[kind](train.astype(np.float64), labels)
    Hq, Wq = H + max(dq, 0), W + max(dq, 0)
    x = rng.standard_normal((B, C, Hq, Wq)).astype(dtype)
    qlab = np.full(B, label) if conditional else None
    try:
        out = m.denoise(x, t, k, labels=qlab, backend=backend)
    except CLEAR:
        return
    assert out.shape == x.shape and out.dtype == x.dtype and np.all(np.isfinite(out))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(KINDS)), backend=st.sampled_from(["cpu", "torch", "cuda"]),
       N=st.integers(1, 4), C=st.sampled_from([1, 3]), H=st.integers(1, 7), W=st.integers(1, 7),
       B=st.integers(1, 3), grow=st.integers(0, 3), dtype=st.sampled_from(["float32", "float64"]),
       half=st.integers(0, 8), t=st.floats(1e-4, 1.0), conditional=st.booleans(), seed=st.integers(0, 1000))
def test_valid_input_gives_a_finite_result_close_to_the_oracle(kind, backend, N, C, H, W, B, grow, dtype, half, t,
                                                              conditional, seed):
    """Valid calls (any machine, backend -- the CUDA engine under the CPU emulator --, size, dtype, k, t and
    labels) return a finite result of the query's shape and dtype that agrees with the float64 oracle (1e-3
    of the data range in float32, 1e-9 in float64; the only refusal allowed is a canvas whose padding signatures no
    training patch has)."""
    if backend == "cuda":
        import cuda_emulation
        from patchmosaic.ops import engines

        engines._EMULATOR = cuda_emulation.module()
    try:
        _valid_call(kind, backend, N, C, H, W, B, grow, dtype, half, t, conditional, seed)
    finally:
        if backend == "cuda":
            engines._EMULATOR = None


def _valid_call(kind, backend, N, C, H, W, B, grow, dtype, half, t, conditional, seed):
    rng = np.random.default_rng(seed)
    train = rng.uniform(-1, 1, (N, C, H, W))
    labels = np.arange(N) % 2 if conditional else None
    k = 2 * half + 1
    if kind == "ELS_circular":
        k = min(k, 2 * ((min(H, W) - 1) // 2) + 1)  # fully-inside keys need k <= min(H, W)
    if kind == "ELS_wrapped":
        k = min(k, 2 * max(H, W) + 1)  # a wrapped patch may go around the image once
    Hq, Wq = (H + grow, W + grow) if kind == "ELS" else (H, W)
    m = KINDS[kind](train, labels)
    x = rng.standard_normal((B, C, Hq, Wq))
    qlab = np.arange(B) % len(np.unique(labels)) if conditional else None
    try:
        out = m.denoise(x.astype(dtype), t, k, labels=qlab, backend=backend)
    except ValueError as e:
        assert "padding signature" in str(e), e
        return
    assert out.shape == x.shape and out.dtype == dtype and np.all(np.isfinite(out))
    # the float64 oracle (the torch backend; for the torch backend's own float64 result, the CPU engine's): within
    # 1e-3 of the data range (2) in float32, 1e-9 in float64
    ref = m.denoise(x, t, k, labels=qlab, backend="cpu" if (backend, dtype) == ("torch", "float64") else "torch")
    assert np.abs(out - ref).max() <= (2e-9 if dtype == "float64" else 2e-3)


# ====================================================================== issue 28: the classes a hostile user found
# ---------------------------------------------------------------------- outputs: checked before the run, by suffix
def test_outputs_are_checked_before_the_run(tmp_path, tiny, capsys):
    """``--out x.npz`` overwrote the picture with the arrays, ``--out /dev/full`` was refused after the whole run.
    Now an output whose suffix is not what is written, a device, a folder or an unwritable place is refused before
    the data are even read (so the data here may as well be missing)."""
    missing = str(tmp_path / "missing.npz")
    cases = [
        (["sample", "--data", missing, "--out", str(tmp_path / "x.npz")], r"--out .*x\.npz: the picture .* \.png"),
        (["sample", "--data", missing, "--out", "/dev/full"], r"/dev/full: it is a device"),
        (["sample", "--data", missing, "--out", str(tmp_path)], r"it is a directory"),
        (["sample", "--data", missing, "--out", "/proc/none/x.png"], r"cannot write|is not a folder"),
        (["demo", "--out", str(tmp_path / "d.jpg")], r"demo picture is written in the \.png format"),
        (["calibrate", "--network", missing, "--data", missing, "--out", str(tmp_path / "ks.txt")], r"\.json"),
        (["calibrate", "--network", missing, "--data", missing, "--out", str(tmp_path / "k.json"), "--state",
          str(tmp_path / "s.json")], r"--state .*\.npz"),
        (["compare", "--network", missing, "--data", missing, "--out", tiny], r"is a regular file, but the comparison folder must be a folder"),
        (["train", "--data", missing, "--out", "/dev/null"], r"/dev/null: it is a device"),
        (["train", "--data", missing, "--out", tiny], r"tiny\.npz: it is a regular file"),
    ]
    for argv, pattern in cases:
        code, err = cli(capsys, *argv)
        assert code == 2 and re.search(pattern, err), (argv, err)
        assert "no data set" not in err and "no network" not in err  # refused before anything was read
    assert not (tmp_path / "x.npz").exists()
    code, _ = cli(capsys, "sample", "--data", tiny, "--k", "3", "--n", "1", "--steps", "1", "--quiet", "--out",
                  str(tmp_path / "UP.PNG"))
    assert code == 0 and (tmp_path / "UP.npz").exists()


def test_output_names_near_the_file_systems_limit(tmp_path, tiny, capsys):
    """A 254-character name (legal: the limit is 255 bytes) passed the check and the run, then its atomic write
    failed ('File name too long': the temporary name was '.' + name + '.XXXXXXXX.png'); a name over the limit
    passed the check too. Now the temporary name holds at most 64 characters of the target's, and the check's
    trial file is as long as the output's name."""
    from patchmosaic.io.files import check_output, write_npz

    long = tmp_path / ("a" * 250 + ".png")
    code, err = cli(capsys, "sample", "--data", tiny, "--k", "3", "--n", "1", "--steps", "1", "--quiet",
                    "--out", str(long))
    assert code == 0 and long.exists() and (tmp_path / ("a" * 250 + ".npz")).exists(), err
    write_npz(str(tmp_path / ("b" * 251 + ".npz")), x=np.zeros(2))
    assert sorted(len(p.name) for p in tmp_path.iterdir()) == [8, 254, 254, 255]  # tiny.npz and no temporary left
    too_long = str(tmp_path / ("c" * 256 + ".png"))
    with pytest.raises(ValueError, match=r"cannot write .*c\.png: its name is longer than the file system allows"):
        check_output(too_long, suffixes=(".png",))
    code, err = cli(capsys, "sample", "--data", str(tmp_path / "missing.npz"), "--out", too_long)
    assert code == 2 and "File name too long" in err and "no data set" not in err, err
    new_folder = str(tmp_path / "new" / ("d" * 256 + ".png"))  # its folder made by the writer: the trial file's name
    with pytest.raises(ValueError, match=r"cannot write a file named 'd+\.png' in .*\(File name too long\)"):
        check_output(new_folder, suffixes=(".png",))


def test_api_output_paths_are_checked_before_any_work(tmp_path, monkeypatch):
    """The CLI checked its outputs before the run, the Python API did not: compare(out_dir=<under a file>) ran the
    network first, calibrate(state=<under a file>) failed after its first step, network_heatmaps(path=<under a
    file>) after its first Jacobians (a NotADirectoryError each); a garbage or foreign heatmaps .partial.npz gave a
    KeyError or a message that did not name it. Each is now a ValueError naming the path before any work."""
    import patchmosaic.experiments.heatmaps as heat
    from patchmosaic.experiments.calibrate import calibrate
    from patchmosaic.experiments.compare import compare
    from patchmosaic.networks import ResNet

    a_file = tmp_path / "f.npz"
    a_file.write_bytes(b"x")
    tr = RNG.uniform(-1, 1, (10, 1, 6, 6)).astype(np.float32)
    els = pm.ELS(tr)

    class Counted(MachineNet):
        calls = 0

        def forward(self, t, x, labels=None):
            Counted.calls += 1
            return super().forward(t, x, labels)

    x1 = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"out_dir .*f\.npz/out: .*f\.npz is not a folder"):
        compare(Counted(els, 3), {"ELS": pm.MachineDenoiser(els, 3)}, x1, steps=2, out_dir=str(a_file / "out"),
                progress=False)
    with pytest.raises(ValueError, match=r"state file .*f\.npz/s\.npz: .*f\.npz is not a folder"):
        calibrate(Counted(els, 3), els, x1, candidates=(3, 5), steps=2, state=str(a_file / "s.npz"), progress=False)
    assert Counted.calls == 0

    def no_jacobian(*a, **k):
        raise AssertionError("a Jacobian was computed before the path was checked")

    monkeypatch.setattr(heat, "_jacobian", no_jacobian)
    torch.manual_seed(0)
    den = pm.NetworkDenoiser(ResNet(channels=1, width=4, depth=1))
    with pytest.raises(ValueError, match=r"path .*f\.npz/heat\.npz: .*f\.npz is not a folder"):
        heat.network_heatmaps(den, tr, [0.5], path=str(a_file / "heat.npz"), progress=False)
    partial = tmp_path / "heat.npz.partial.npz"
    partial.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"heat\.npz\.partial\.npz is not a heatmaps' partial file"):
        heat.network_heatmaps(den, tr, [0.5], path=str(tmp_path / "heat.npz"), progress=False)
    np.savez(partial, maps=np.zeros(3))
    with pytest.raises(ValueError, match=r"heat\.npz\.partial\.npz is not .* needs arrays 'fingerprint'"):
        heat.network_heatmaps(den, tr, [0.5], path=str(tmp_path / "heat.npz"), progress=False)


# --------------------------------------------------------------------------- memory: estimated before allocating
def test_memory_is_checked_before_allocating(tmp_path, capsys, monkeypatch):
    """demo --n 400000 allocated its noise before its check; calibrate --k-max 2147483647 built a billion-element
    list; DataLocal allocated the D x D Jacobian (and check_request approved a call needing 512 GiB). Each is now
    refused from its arguments, at once."""
    for argv, pattern in ((["demo", "--samples", "400000", "--quiet", "--out", str(tmp_path / "d.png")], r"GiB"),):
        t0 = time.perf_counter()
        code, err = cli(capsys, *argv)
        assert code == 2 and re.search(pattern, err) and time.perf_counter() - t0 < 5, err
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"k_max = 2147483647 is larger than any useful"):
        pm.calibrate(MachineNet(pm.ELS(IMGS), 3), pm.ELS(IMGS), torch.zeros(1, 1, 12, 12), k_max=2147483647)
    with pytest.raises(pm.ResourceError, match=r"sensitivity fields of every pixel pair: 512\.00 GiB"):
        pm.DataLocal(np.zeros((2, 1, 512, 512), np.float32))
    dl = pm.DataLocal(IMGS)
    monkeypatch.setattr("patchmosaic.validation.available_memory", lambda: 1 << 20)  # 1 MiB: the fields need more
    with pytest.raises(pm.ResourceError, match="sensitivity fields of a new noise level"):
        dl.check_request((1, 1, 12, 12), k=3)
    assert time.perf_counter() - t0 < 5


def test_large_wiener_fields_are_computed_in_blocks_equal_to_the_whole(monkeypatch):
    from patchmosaic.machines import locality

    w = pm.Wiener(np.random.default_rng(2).uniform(-1, 1, (200, 3, 6, 6)).astype(np.float32))
    whole = locality.pixel_fields(w, 0.3)
    monkeypatch.setattr(locality, "JACOBIAN_BLOCK", 1 << 14)  # a few rows of J at a time
    assert torch.allclose(locality.pixel_fields(w, 0.3), whole, rtol=1e-12, atol=1e-14)


def test_a_flat_index_counts_all_its_parts_before_hashing_a_key(monkeypatch):
    """PatchIndex(kind='flat') compared only its largest part with the free memory, after merging duplicates (60,000
    MNIST digits at k = 31: 236 GB, no answer in 15 minutes). Now every part counts, before any key is hashed:
    exactly without merging, from a sample with it -- low, so that data whose duplicates merge away still passes."""
    pytest.importorskip("faiss")
    from patchmosaic.index import patch_index

    distinct = np.random.default_rng(3).uniform(-1, 1, (60, 1, 12, 12)).astype(np.float32)
    blank = np.zeros_like(distinct)
    blank[:, :, 0, 0] = np.arange(60)[:, None] / 60  # few distinct 9x9 patches: most are all zero
    need = 60 * 144 * (81 * 4 + 16)  # keys x (vector + id + count): 2.9 MB unmerged
    monkeypatch.setattr(patch_index, "available_memory", lambda: need * 2 // 3)  # above the merge's working memory
    hashed = []
    real = patch_index.row_hashes
    monkeypatch.setattr(patch_index, "row_hashes", lambda v: hashed.append(len(v)) or real(v))
    with pytest.raises(pm.ResourceError, match=r"flat patch index of 8,640 keys .* without merging"):
        pm.PatchIndex(pm.ELS(distinct), 9, kind="flat", merge=False, progress=False)
    assert not hashed
    with pytest.raises(pm.ResourceError, match=r"after merging duplicates: about 100% of them distinct"):
        pm.PatchIndex(pm.ELS(distinct), 9, kind="flat", progress=False)
    assert sum(hashed) <= patch_index.PatchIndex.SAMPLE_KEYS  # a sample, not the merge
    idx = pm.PatchIndex(pm.ELS(blank), 9, kind="flat", progress=False)
    assert sum(len(p.keys) for p in idx.parts) * (81 * 4 + 16) <= need // 2


def test_an_index_manifest_of_the_wrong_json_shape_is_named(tmp_path):
    pytest.importorskip("faiss")
    m = pm.ELS(IMGS)
    pm.PatchIndex(m, 3, kind="flat", progress=False).save(str(tmp_path / "i"))
    for value in ([1, 2], "x", None, {"parts": [{"file": "../../etc/passwd"}]}, {"k": "3"}):
        (tmp_path / "i" / "manifest.json").write_text(json.dumps(value))
        with pytest.raises(ValueError, match=r"manifest\.json is not a patch index manifest"):
            pm.PatchIndex.load(str(tmp_path / "i"), m, 3)


# ------------------------------------------------------------------------------------- training: no NaN checkpoint
def test_training_that_diverges_stops_without_a_nan_checkpoint(tmp_path, capsys):
    """--lr 1e30 and --weight-decay inf exited 0 with a NaN checkpoint. Non-finite settings are refused; a run whose
    loss or weights stop being finite stops at that step, keeping the last good checkpoint."""
    from patchmosaic.networks import TrainConfig, load, train

    x = torch.from_numpy(IMGS[:16, :, :8, :8])
    cfg = {"arch": "resnet", "channels": 1, "width": 4, "depth": 1, "padding": "zeros", "num_classes": 0}
    for bad in (dict(lr=float("nan")), dict(weight_decay=float("inf")), dict(ema_decay=float("nan"))):
        with pytest.raises(ValueError, match="must be a finite number"):
            train(dict(cfg), x, out=str(tmp_path / "n"), config=TrainConfig(steps=2, batch_size=4, **bad),
                  progress=False)
    with pytest.raises(ValueError, match=r"training diverged at step \d+: .*lr=1e\+30.*no checkpoint was written"):
        train(dict(cfg), x, out=str(tmp_path / "d"), config=TrainConfig(steps=5, batch_size=4, lr=1e30),
              progress=False)
    assert not (tmp_path / "d" / "model.safetensors").exists()
    train(dict(cfg), x, out=str(tmp_path / "g"), config=TrainConfig(steps=2, batch_size=4), progress=False)
    with pytest.raises(ValueError, match=r"diverged .*the checkpoint of step 2 .* is kept"):
        train(dict(cfg), x, out=str(tmp_path / "g"), config=TrainConfig(steps=6, batch_size=4, lr=1e30),
              progress=False, override=True)
    net, info, _ = load(str(tmp_path / "g"))
    assert info["step"] == 2 and all(bool(torch.isfinite(p).all()) for p in net.parameters())
    for argv in (["--lr", "1e30"], ["--weight-decay", "inf"], ["--lr", "nan"]):
        code, err = cli(capsys, "train", "--steps", "2", "--out", str(tmp_path / "c"), *argv)
        assert code == 2 and f"argument {argv[0]}" in err


def test_resuming_on_other_data_of_the_same_shape_is_refused(tmp_path):
    from patchmosaic.networks import TrainConfig, train

    x = torch.from_numpy(IMGS[:16, :, :8, :8])
    cfg = {"arch": "resnet", "channels": 1, "width": 4, "depth": 1, "padding": "zeros", "num_classes": 0}
    train(dict(cfg), x, out=str(tmp_path), config=TrainConfig(steps=2, batch_size=4), progress=False)
    with pytest.raises(ValueError, match=r"at step 2 with other training data .*override=True"):
        train(dict(cfg), x.flip(0), out=str(tmp_path), config=TrainConfig(steps=3, batch_size=4), progress=False)
    train(dict(cfg), x.flip(0), out=str(tmp_path), config=TrainConfig(steps=3, batch_size=4), progress=False,
          override=True)
    hist = json.load(open(tmp_path / "config.json"))["info"]["train"]["history"]
    assert [h["from_step"] for h in hist] == [0, 2] and hist[0]["data"] != hist[1]["data"]
    train(dict(cfg), x.flip(0), out=str(tmp_path), config=TrainConfig(steps=4, batch_size=4), progress=False)


# --------------------------------------------------------------------- messages that name the option or the file
def test_messages_name_the_option_or_the_file(tmp_path, tiny, capsys):
    """"invalid literal for int()", "Overflow when unpacking long long", "'numpy.ndarray' object does not support the
    context manager protocol" and a truncated image without its name: each now names what is wrong."""
    from PIL import Image

    from patchmosaic.networks import ResNet, save

    net = str(tmp_path / "net")
    save(net, ResNet(1, 4, 1))
    np.save(tmp_path / "s.npy", np.zeros((2, 1, 32, 32), np.float32))
    os.replace(tmp_path / "s.npy", tmp_path / "seeds.npz")
    folder = tmp_path / "pics"
    folder.mkdir()
    buf = tmp_path / "ok.png"
    Image.fromarray(RNG.integers(0, 256, (32, 32), dtype=np.uint8)).save(buf)
    (folder / "half.png").write_bytes(buf.read_bytes()[:150])
    out = str(tmp_path / "o.png")
    for argv, pattern in (
            (["sample", "--data", tiny, "--labels", "a,b", "--out", out], r"--labels takes comma-separated integers"),
            (["sample", "--data", tiny, "--classes", "1;2", "--out", out], r"--classes takes comma-separated"),
            (["sample", "--data", tiny, "--seed", str(2**70), "--out", out], r"argument --seed: must lie in"),
            (["sample", "--data", tiny, "--n", "x", "--out", out], r"argument --n/--samples: expected an integer"),
            (["sample", "--data", tiny, "--canvas", "5x", "--out", out], r"--canvas reads HxW"),
            (["calibrate", "--network", "n", "--data", tiny, "--candidates", "3,x", "--out",
              str(tmp_path / "k.json")], r"--candidates takes comma-separated"),
            (["compare", "--network", net, "--data", tiny, "--seeds-file", str(tmp_path / "seeds.npz"), "--out",
              str(tmp_path / "c")], r"seeds\.npz is not a readable seeds \.npz .*: it holds a single array"),
            (["sample", "--data", str(folder), "--out", out], r"half\.png is not a readable image")):
        code, err = cli(capsys, *argv)
        assert code == 2 and re.search(pattern, err), (argv, err)
        assert "invalid literal" not in err and "Overflow" not in err and "context manager" not in err


def test_a_network_of_other_channels_is_named_before_it_runs(tmp_path, tiny, capsys):
    """A 3-channel network given 1-channel data said only "The following operation failed in the TorchScript
    interpreter"; the mismatch is named before the network runs (API and command line)."""
    from patchmosaic.networks import ResNet, network_channels, save

    net = ResNet(3, 4, 1)
    calls = []
    net.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"the network takes 3-channel images, but x has 1 channel"):
        pm.NetworkDenoiser(net).eps(torch.zeros(2, 1, 8, 8), 0.5)
    assert not calls
    assert network_channels(scripted(ResNet(3, 4, 1))) == 3 and network_channels(lambda t, x, y: x) is None
    save(str(tmp_path / "net3"), ResNet(3, 4, 1))
    code, err = cli(capsys, "calibrate", "--network", str(tmp_path / "net3"), "--data", tiny, "--out",
                    str(tmp_path / "k.json"))
    assert code == 2 and "takes 3-channel images, but --data" in err and "1-channel" in err


# ------------------------------------------------------------------------------------------- Ctrl-C and the variant
def test_ctrl_c_exits_130_saying_what_was_saved(tmp_path, tiny, capsys, monkeypatch):
    from patchmosaic.experiments import synthesis
    from patchmosaic.networks import TrainConfig, train

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthesis, "run_sample", interrupted)
    assert main(["sample", "--data", tiny, "--out", str(tmp_path / "s.png")]) == 130
    assert capsys.readouterr().err.strip() == "patchmosaic sample: interrupted; nothing was written (the files are " \
                                              "written at the end)"
    out = str(tmp_path / "net")
    x = torch.from_numpy(IMGS[:8, :, :8, :8])
    train({"arch": "resnet", "channels": 1, "width": 4, "depth": 1, "padding": "zeros", "num_classes": 0}, x, out=out,
          config=TrainConfig(steps=3, batch_size=4), progress=False)
    monkeypatch.setattr("patchmosaic.networks.train", interrupted)
    assert main(["train", "--data", tiny, "--out", out, "--steps", "9"]) == 130
    assert f"interrupted; the checkpoint of step 3 in {out} is kept: rerun the same command to resume" in \
        capsys.readouterr().err


def _as_from_a_terminal():
    """A child's SIGINT as a terminal's Ctrl-C finds it: a shell without job control starts background jobs with
    SIGINT ignored, the suite's children inherit that, and Python installs no KeyboardInterrupt where SIGINT is
    ignored at start-up (the command then runs on, rightly: it was started to ignore Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupted(cmd, env, ready, delay):
    """Run cmd, send it SIGINT `delay` seconds after its stderr's first line (`ready` begins it: the command has
    started its work; a fixed delay from the start raced the imports on a loaded machine); its exit code and the
    rest of its stderr (the child killed if it outlives the check, so that a failure leaves no process behind)."""
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal)
    try:
        first = p.stderr.readline()
        assert first.startswith(ready), first
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return p.returncode, err


def test_a_real_ctrl_c_stops_the_command_with_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="1")
    rc, err = _interrupted([sys.executable, "-m", "patchmosaic", "sample", "--steps", "400", "--samples", "8",
                            "--out", str(tmp_path / "s.png")], env, "patchmosaic sample: 8 samples", 1)
    assert rc == 130 and err.strip() == "patchmosaic sample: interrupted; nothing was written (the files " \
                                        "are written at the end)", err
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("machine", ["ELS", "LS"])
def test_ctrl_c_stops_a_long_cpu_engine_call_early(machine):
    """A Ctrl-C inside one long compiled call (the patch engine: ELS; the same-position one: LS) stops it between
    work items, not when the call ends: the call's thread asks Python's signal handlers every 50 ms. The signal comes
    a quarter of the way into a call measured beforehand; the interrupted call must end before three quarters of
    it (one thread; the same-position engine's items are parts of 512 images, an eighth of this call each). The
    machine answers the same afterwards, bit for bit. With the poll withdrawn (the switch bench/stop_poll.py times
    with), the same signal waits for the call's end."""
    import threading

    x = np.tile(IMGS[:, :, :12, :12], (-(-4096 // len(IMGS)), 1, 1, 1))[:4096].astype(np.float32)
    m = getattr(pm, machine)(x)
    q = torch.from_numpy(np.random.default_rng(3).uniform(-1, 1, (4, 1, 12, 12)).astype(np.float32))
    small = m.denoise(q[:1], 0.5, k=3)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # (as a terminal's Ctrl-C finds it)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        while True:  # a call long enough for the clock's and the timer's resolution
            t0 = time.perf_counter()
            m.denoise(q, 0.9, k=11)
            full = time.perf_counter() - t0
            if full >= 0.4 or len(q) >= 256:
                break
            q = torch.cat([q, q])

        def interrupted():  # seconds until the call, sent SIGINT a quarter of the way in, raised
            timer = threading.Timer(full / 4, os.kill, (os.getpid(), signal.SIGINT))
            t0 = time.perf_counter()
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                m.denoise(q, 0.9, k=11)
            took = time.perf_counter() - t0
            timer.join()
            return took

        took = interrupted()
        module = pm.ops.engines._CPU_MODULE
        assert module._set_stop_poll(False) is True
        try:
            took_without = interrupted()
        finally:
            assert module._set_stop_poll(True) is False
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, old)
    assert took < 0.75 * full, (took, full)
    assert took_without > 0.75 * full, (took_without, full)  # (0.97-1.03 of it in 6 runs here)
    assert torch.equal(m.denoise(q[:1], 0.5, k=3), small)


# ------------------------------------------------------------------ issue 28: what the hostile campaign found
def test_what_the_campaign_found(tmp_path):
    """bench/hostile_campaign.py's defects, each now a clear error or a correct result (see bench/RESULTS.md 11)."""
    from PIL import Image

    from patchmosaic.networks import TrainConfig, train

    den = pm.MachineDenoiser(pm.ELS(IMGS), 3)
    x = IMGS[:2]
    with pytest.raises(TypeError, match="generator must be a seeded torch.Generator"):
        pm.ddpm(den, x, generator=5, steps=2, progress=False)
    t0 = time.perf_counter()
    with pytest.raises(pm.ResourceError, match="a time grid of 10000000000 steps"):
        pm.ddim(den, x, steps=10**10, progress=False)
    assert time.perf_counter() - t0 < 2
    for device in ("gpu", "meta"):
        with pytest.raises(ValueError, match=rf"TrainConfig.device \(--device\) '{device}' is not a device"):
            train({"arch": "resnet", "channels": 1, "width": 4, "depth": 1, "padding": "zeros", "num_classes": 0},
                  x, out=str(tmp_path / "t"), config=TrainConfig(steps=1, device=device), progress=False)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")  # grey first, then colour: keep colour
    Image.fromarray(red).save(tmp_path / "b.png")
    imgs, _ = pm.data.load(str(tmp_path), size=None)
    assert imgs.shape == (2, 3, 8, 8) and imgs[1, :, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert pm.data.load(str(tmp_path), size=None, limit=1)[0].shape == (1, 1, 8, 8)


def test_inverted_file_parts_smaller_than_their_lists_are_built():
    """The campaign: an IVF index over parts with fewer keys than lists (or than an IVF-PQ codebook) stopped with
    faiss's raw "Number of training points should be at least as large as number of clusters"."""
    pytest.importorskip("faiss")
    small = pm.ELS(IMGS[:6])  # parts of 6 keys
    x = IMGS[:2]
    for kind in ("ivf", "ivfpq"):
        idx = pm.PatchIndex(small, 3, kind=kind, min_index_keys=0, progress=False)
        assert np.isfinite(idx.denoise(x, 0.5).x0.numpy()).all()


def test_finished_runs_are_read_without_writing_and_odd_names_and_schedules(tmp_path, monkeypatch):
    """Regressions of the day's fixes, found by a review: a finished calibration state (or heatmaps cache) in a folder
    that cannot be written was refused by the new writability check, though nothing is left to write; a 248-byte
    name of multi-byte characters passed the check and failed at the write (the temporary name kept 64 characters,
    not bytes); Linear(beta_min=20, beta_max=0.1) (a falling beta, noise still growing) was refused."""
    import patchmosaic.io.files as files
    from patchmosaic.experiments.calibrate import calibrate
    from patchmosaic.io.files import check_output, write_npz

    tr = RNG.uniform(-1, 1, (8, 1, 6, 6)).astype(np.float32)
    els = pm.ELS(tr)
    x1 = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    state = str(tmp_path / "s.npz")
    first = calibrate(MachineNet(els, 3), els, x1, candidates=(3, 5), steps=2, state=state, progress=False)

    def unwritable(*a, **k):
        raise ValueError("cannot write here")

    monkeypatch.setattr(files, "check_output", unwritable)  # (the folder made read-only)
    again = calibrate(MachineNet(els, 3), els, x1, candidates=(3, 5), steps=2, state=state, progress=False)
    assert again.schedule == first.schedule
    monkeypatch.undo()
    name = str(tmp_path / ("\U0001F600" * 61 + ".npz"))  # 248 bytes
    check_output(name, suffixes=(".npz",))
    write_npz(name, x=np.zeros(1))
    assert os.path.exists(name)
    assert float(pm.schedules.Linear(beta_min=20, beta_max=0.1).alpha_bar(0.5)) < 1
