"""User errors that used to pass silently or fail obscurely: numpy input to the samplers, CUDA input on a
torch without CUDA, and labels that do not match a network's or a machine's conditioning. Each gives a clear
error naming the problem (or, for numpy, works as ``Machine.denoise`` does)."""

import os
import re

import numpy as np
import pytest
import torch

import patchmosaic as pm
from conftest import SHARED, scripted
from patchmosaic.networks import ResNet, TrainConfig, load, load_network, network_classes, save, train

RNG = np.random.default_rng(7)
IMGS = RNG.uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
LABELS = np.arange(12) % 3
MODELS = os.path.join(SHARED, "models")
NO_CUDA = "but this torch has no CUDA"


class Counting:
    """A denoiser that counts its calls (to show an error came before any work)."""

    schedule = pm.schedules.get_schedule("cosine_legacy")

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, labels=None):
        self.calls += 1
        return torch.zeros_like(x)


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it lives on a CUDA device: the input a CUDA user hands over, on any machine."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def fake_cuda(a) -> torch.Tensor:
    return torch.as_tensor(a).as_subclass(FakeCuda)


@pytest.fixture
def no_cuda(monkeypatch):
    """This torch has no CUDA (already so on a CPU build; forced on a CUDA build)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --------------------------------------------------------------------------- 1. numpy into the samplers
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("labels", [None, np.array([0, 2]), [1, 1], 2, torch.tensor([2, 0])])
def test_samplers_take_numpy_as_denoise_does(dtype, labels):
    m = pm.ELS(IMGS, LABELS)
    den = pm.MachineDenoiser(m, 3)
    x1 = RNG.standard_normal((2, 1, 8, 8)).astype(dtype)
    assert isinstance(m.denoise(x1, 0.5, 3, labels), np.ndarray)  # the convention followed
    gen = {"ddim": {}, "ddpm": {"generator": torch.Generator().manual_seed(3)}}
    for sampler in (pm.ddim, pm.ddpm):
        out = sampler(den, x1, labels, steps=3, progress=False, **gen[sampler.__name__])
        gen["ddpm"]["generator"].manual_seed(3)
        want = sampler(den, torch.from_numpy(x1), labels, steps=3, progress=False, **gen[sampler.__name__])
        gen["ddpm"]["generator"].manual_seed(3)
        assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == x1.shape
        assert np.array_equal(out, want.numpy())


def test_numpy_through_every_denoiser():
    m = pm.ELS(IMGS)
    x = RNG.standard_normal((2, 1, 8, 8))
    md = pm.MachineDenoiser(m, 5)
    for got, want in ((md(x, 0.4), m.denoise(x, 0.4, 5)), (md.eps(x, 0.4), m.eps(x, 0.4, 5)),
                      (md.score(x, 0.4), m.score(x, 0.4, 5))):
        assert isinstance(got, np.ndarray) and got.dtype == np.float64
        assert np.allclose(got, want, atol=1e-10)
    nd = pm.NetworkDenoiser(ResNet(1, 4, 1))
    xt = torch.from_numpy(x)
    for method in (nd, nd.eps, nd.score):
        got = method(x, 0.4)
        assert isinstance(got, np.ndarray) and got.dtype == np.float64
        assert np.array_equal(got, method(xt, 0.4).numpy())
    out = pm.ddim(nd, x.astype(np.float32), steps=2, progress=False)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32


def test_sampler_input_errors_match_denoise_and_come_first():
    den = Counting()
    with pytest.raises(TypeError, match="x1 must be float32 or float64, got numpy dtype int64"):
        pm.ddim(den, np.zeros((2, 1, 8, 8), np.int64), progress=False)
    with pytest.raises(TypeError, match="x must be float32 or float64, got numpy dtype int64"):
        pm.ELS(IMGS).denoise(np.zeros((2, 1, 8, 8), np.int64), 0.5, 3)
    with pytest.raises(TypeError, match="x1 must be float32 or float64, got torch.float16"):
        pm.ddim(den, torch.zeros(2, 1, 8, 8, dtype=torch.float16), progress=False)
    with pytest.raises(ValueError, match=r"one label per image \(2\), got shape \(3,\)"):
        pm.ddim(den, np.zeros((2, 1, 8, 8), np.float32), [0, 1, 2], progress=False)
    with pytest.raises(TypeError, match="labels must be integers"):
        pm.ddim(den, np.zeros((2, 1, 8, 8), np.float32), np.array([0.5, 1.0]), progress=False)
    assert den.calls == 0


# ------------------------------------------------------------------ 2. CUDA input on a torch without CUDA
def test_cuda_devices_are_refused_clearly(no_cuda, tmp_path):
    net = ResNet(1, 4, 1)
    save(str(tmp_path / "net"), net)
    calls = [
        lambda: pm.NetworkDenoiser(net, device="cuda"),
        lambda: pm.NetworkDenoiser(net, device=torch.device("cuda", 1)),
        lambda: load_network(str(tmp_path / "net"), device="cuda"),
        lambda: load(str(tmp_path / "net"), device=torch.device("cuda")),
        lambda: train(net, IMGS, out=str(tmp_path / "t"), config=TrainConfig(steps=1, device="cuda"), progress=False),
    ]
    if os.path.isdir(MODELS):  # a TorchScript file (torch's own message here blamed the file)
        calls.append(lambda: load_network(os.path.join(MODELS, "mnist_resnet_zeros", "model.pt"), device="cuda:0"))
    from patchmosaic.experiments.train_preset import list_presets, run_preset
    from patchmosaic.networks.timing import step_seconds

    said = []
    calls += [lambda: run_preset("mnist2k_resnet_tiny", str(tmp_path / "p"), device="cuda", say=said.append),
              lambda: list_presets(device="cuda", say=said.append),
              lambda: step_seconds({"arch": "resnet", "channels": 1, "width": 4, "depth": 1}, 2, device="cuda")]
    for call in calls:
        with pytest.raises(RuntimeError, match=f"asks for a CUDA device, {NO_CUDA}.*is_available\\(\\) is False"):
            call()
    assert not os.path.exists(tmp_path / "t") and not os.path.exists(tmp_path / "p")  # refused before any work
    assert said == []
    # the CLI: exit code 2 and the one-line reason (it was an "internal error" for a preset and --list-presets)
    from patchmosaic.experiments.cli import main

    for argv in (["train", "--preset", "mnist2k_resnet_tiny", "--device", "cuda", "--out", str(tmp_path / "c"),
                  "--quiet"], ["train", "--list-presets", "--device", "cuda"]):
        assert main(argv) == 2, argv
    assert not os.path.exists(tmp_path / "c")


def test_a_network_denoiser_refuses_non_finite_noise_before_the_network_runs():
    class Net(torch.nn.Module):
        calls = 0

        def forward(self, t, x, labels=None):
            Net.calls += 1
            return torch.zeros_like(x)

    x = torch.zeros(2, 1, 8, 8)
    x[1, 0, 3, 3] = float("nan")
    for call in (lambda: pm.NetworkDenoiser(Net())(x, 0.5), lambda: pm.NetworkDenoiser(Net()).eps(x, 0.5),
                 lambda: pm.ddim(pm.NetworkDenoiser(Net()), x, steps=2, progress=False)):
        with pytest.raises(ValueError, match=r"x contains NaN or infinite values \(shape \(2, 1, 8, 8\)\)"):
            call()
    assert Net.calls == 0


def test_a_schedule_callable_of_one_float_works_and_a_broken_one_is_named():
    import math

    by_float = pm.ELS(IMGS, schedule=lambda t: math.cos(t * math.pi / 2) ** 2)
    by_array = pm.ELS(IMGS, schedule=lambda t: np.cos(np.asarray(t) * np.pi / 2) ** 2)
    x = torch.from_numpy(RNG.standard_normal((2, 1, 8, 8)))
    assert torch.equal(by_float.denoise(x, 0.4, 3), by_array.denoise(x, 0.4, 3))
    both = np.array([0.3, 0.6])
    assert torch.equal(by_float.denoise(x, both, 3), by_array.denoise(x, both, 3))
    assert torch.equal(by_float.denoise(x, torch.from_numpy(both), 3), by_float.denoise(x, both, 3))

    def old_numpy_cos(t):  # math.cos of an array on numpy < 2.3: a float for one element, with a warning
        if isinstance(t, np.ndarray):
            if t.size != 1:
                raise TypeError("only length-1 arrays can be converted to Python scalars")
            import warnings

            warnings.warn("Conversion of an array with ndim > 0 to a scalar is deprecated", DeprecationWarning)
            t = float(t.reshape(-1)[0])
        return math.cos(t * math.pi / 2) ** 2

    one = x[:1]
    assert torch.equal(pm.ELS(IMGS, schedule=old_numpy_cos).denoise(one, 0.4, 3), by_array.denoise(one, 0.4, 3))

    def broken(t):
        raise KeyError("no")

    with pytest.raises(TypeError, match="schedule callable 'broken' failed on a numpy array of times .* and on a "
                                        "single float time"):
        pm.ELS(IMGS, schedule=broken).denoise(x, 0.4, 3)


def test_times_that_are_no_numbers_are_a_type_error_on_every_machine():
    x = torch.zeros(1, 1, 8, 8)
    machines = [lambda t: pm.ELS(IMGS).denoise(x, t, 3), lambda t: pm.DataLocal(IMGS).denoise(x, t, 3),
                lambda t: pm.IS(IMGS).denoise(x, t), lambda t: pm.Wiener(IMGS).denoise(x, t)]
    for call in machines:
        for t in (None, "0.5", True, np.array([True])):
            with pytest.raises(TypeError, match="t must be a float in \\(0, 1\\] or an array of them"):
                call(t)


def test_the_query_sharding_module_is_reached_from_the_package():
    import subprocess
    import sys

    code = "import patchmosaic as pm; print(pm.distributed.queries.Layout.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
    assert out.returncode == 0 and out.stdout.strip() == "Layout", out.stderr


def test_cuda_tensors_are_refused_clearly_before_any_work(no_cuda):
    m, ml = pm.ELS(IMGS), pm.ELS(IMGS, LABELS)
    x, cx = torch.zeros(2, 1, 8, 8), fake_cuda(torch.zeros(2, 1, 8, 8))
    den = Counting()
    calls = {
        "x": [lambda: m.denoise(cx, 0.5, 3), lambda: m.eps(cx, 0.5, 3), lambda: m.score(cx, 0.5, 3),
              lambda: m.sensitivity(cx, 0.5, 3), lambda: pm.IS(IMGS).denoise(cx, 0.5),
              lambda: pm.MachineDenoiser(m, 3)(cx, 0.5), lambda: pm.NetworkDenoiser(ResNet(1, 4, 1))(cx, 0.5),
              lambda: pm.NetworkDenoiser(ResNet(1, 4, 1)).eps(cx, 0.5), lambda: pm.IndexedDenoiser(m, 3)(cx, 0.5)],
        "x1": [lambda: pm.ddim(den, cx, progress=False),
               lambda: pm.ddpm(den, cx, generator=torch.Generator(), progress=False)],
        "t": [lambda: m.denoise(x, fake_cuda(torch.full((2,), 0.5)), 3),
              lambda: pm.NetworkDenoiser(ResNet(1, 4, 1)).eps(x, fake_cuda(torch.full((2,), 0.5)))],
        "labels": [lambda: ml.denoise(x, 0.5, 3, fake_cuda(torch.tensor([0, 1]))),
                   lambda: pm.ddim(den, x, fake_cuda(torch.tensor([0, 1])), progress=False)],
        "images": [lambda: pm.ELS(fake_cuda(torch.from_numpy(IMGS)))],
        "pixels": [lambda: m.denoise(x, 0.5, 3, pixels=fake_cuda(torch.ones(8, 8, dtype=torch.bool)))],
    }
    for name, group in calls.items():
        for call in group:
            with pytest.raises(RuntimeError, match=f"^{name} is a CUDA tensor \\(on cuda:0\\), {NO_CUDA}"):
                call()
    assert den.calls == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device here (the test needs a real CUDA tensor)")
def test_a_real_cuda_tensor_when_torch_stops_seeing_cuda(monkeypatch):
    x = torch.zeros(2, 1, 8, 8, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=f"x is a CUDA tensor .*{NO_CUDA}.*sees no CUDA device"):
        pm.ELS(IMGS).denoise(x, 0.5, 3)


def test_cpu_and_odd_devices_pass_the_cuda_check(no_cuda):
    from patchmosaic.ops.checks import check_cuda_inputs

    check_cuda_inputs(a=torch.zeros(1), b="cpu", c=torch.device("cpu"), d=None, e=0.5, f=np.zeros(2), g="gpu")


class CountingNet(torch.nn.Module):
    """An eps network that counts its calls (to show an error came before any work)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, t, x, labels=None):
        self.calls += 1
        return torch.zeros_like(x)


def refused_as(name: str):
    return pytest.raises(RuntimeError, match=f"^{re.escape(name)} is a CUDA tensor \\(on cuda:0\\), {NO_CUDA}")


def test_calibration_comparison_and_switch_time_refuse_cuda_tensors_before_any_work(no_cuda, tmp_path):
    m, ml = pm.ELS(IMGS), pm.ELS(IMGS, LABELS)
    x, cx = torch.zeros(2, 1, 8, 8), fake_cuda(torch.zeros(2, 1, 8, 8))
    clab = fake_cuda(torch.tensor([0, 1]))
    net = CountingNet()
    machines = {"IS": pm.MachineDenoiser(pm.IS(IMGS))}
    calls = {
        "x1": [lambda: pm.calibrate(net, m, cx, candidates=(3,), steps=2, progress=False),
               lambda: pm.compare(net, machines, cx, steps=2, out_dir=str(tmp_path / "c"), progress=False),
               lambda: pm.calibrate_t_max(m, 3, cx, steps=2)],
        "labels": [lambda: pm.calibrate(net, ml, x, clab, candidates=(3,), steps=2, progress=False),
                   lambda: pm.compare(net, machines, x, clab, steps=2, progress=False),
                   lambda: pm.calibrate_t_max(ml, 3, x, clab, steps=2)],
        "states[1]": [lambda: pm.calibrate_t_max(m, 3, x, steps=2, states=[x, fake_cuda(x), x])],
    }
    for name, group in calls.items():
        for call in group:
            with refused_as(name):
                call()
    assert net.calls == 0 and not os.path.exists(tmp_path / "c")


def test_patch_index_queries_refuse_cuda_tensors_before_any_work(no_cuda):
    pytest.importorskip("faiss")
    from patchmosaic.index import query

    index = pm.PatchIndex(pm.ELS(IMGS, LABELS), 3, kind="flat", progress=False)
    x, cx = torch.zeros(2, 1, 8, 8), fake_cuda(torch.zeros(2, 1, 8, 8))
    with refused_as("x"):
        index.denoise(cx, 0.5, [0, 1])
    with refused_as("t"):
        index.denoise(x, fake_cuda(torch.full((2,), 0.5)), [0, 1])
    with refused_as("labels"):
        query.approx_denoise(index, x, 0.5, fake_cuda(torch.tensor([0, 1])))
    assert index.denoise(x, 0.5, [0, 1]).x0.shape == x.shape  # the same call on the CPU runs


# ------------------------------------------------------------------ 3. labels and conditioning
def test_network_classes_are_read_from_the_network():
    assert network_classes(ResNet(1, 4, 1, num_classes=3)) == 3
    assert network_classes(scripted(ResNet(1, 4, 1, num_classes=3))) == 3
    assert network_classes(ResNet(1, 4, 1)) == 0
    assert network_classes(lambda t, x, y: x) is None
    assert network_classes(torch.nn.Identity()) is None


@pytest.mark.parametrize("script", [False, True])
def test_a_conditional_network_needs_labels_and_an_unconditional_one_refuses_them(script):
    cond, uncond = ResNet(1, 4, 1, num_classes=3), ResNet(1, 4, 1)
    if script:
        cond, uncond = scripted(cond), scripted(uncond)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"class-conditional \(3 classes\) but no labels were given"):
        pm.NetworkDenoiser(cond)(x, 0.5)
    with pytest.raises(ValueError, match=r"class-conditional \(3 classes\) but no labels"):
        pm.ddim(pm.NetworkDenoiser(cond), x, steps=2, progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for this network, got 1..3"):
        pm.NetworkDenoiser(cond).eps(x, 0.5, [1, 3])
    with pytest.raises(ValueError, match="labels were given but the network is unconditional"):
        pm.NetworkDenoiser(uncond).eps(x, 0.5, [0, 1])
    with pytest.raises(ValueError, match="conditional=True, but the network is unconditional"):
        pm.NetworkDenoiser(uncond, conditional=True)
    # the right calls run
    assert pm.NetworkDenoiser(cond)(x, 0.5, [0, 2]).shape == x.shape
    assert pm.NetworkDenoiser(uncond)(x, 0.5).shape == x.shape


def test_running_a_conditional_network_without_labels_is_explicit_and_warned():
    net = ResNet(1, 4, 1, num_classes=3).eval()
    x = torch.randn(2, 1, 8, 8)
    with pytest.warns(UserWarning, match=r"runs a class-conditional network \(3 classes\) without labels"):
        d = pm.NetworkDenoiser(net, conditional=False)
    with torch.no_grad():
        want = net(torch.full((2,), 0.5), x, None)
    assert torch.equal(d.eps(x, 0.5), want) and torch.equal(d.eps(x, 0.5, [0, 1]), want)  # labels dropped
    # an unconditional network with conditional=False drops labels without a word
    pm.NetworkDenoiser(ResNet(1, 4, 1), conditional=False).eps(x, 0.5, [0, 1])
    with pytest.raises(ValueError, match="conditional must be None, True or False"):
        pm.NetworkDenoiser(net, conditional="yes")


def test_a_network_that_cannot_be_read_gets_what_it_is_given_unless_told():
    seen = []

    def net(t, x, labels):
        seen.append(labels)
        return torch.zeros_like(x)

    x = torch.randn(2, 1, 8, 8)
    pm.NetworkDenoiser(net).eps(x, 0.5)
    pm.NetworkDenoiser(net).eps(x, 0.5, [1, 2])
    assert seen[0] is None and seen[1].tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"class-conditional \(conditional=True\) but no labels"):
        pm.NetworkDenoiser(net, conditional=True).eps(x, 0.5)


def test_a_trained_conditional_checkpoint_needs_labels(tmp_path):
    x, y = IMGS[:8], LABELS[:8]
    train(ResNet(1, 4, 1, num_classes=3), x, y, out=str(tmp_path), config=TrainConfig(steps=2, ema_decay=0),
          progress=False)
    d = pm.NetworkDenoiser(load_network(str(tmp_path)))
    with pytest.raises(ValueError, match=r"class-conditional \(3 classes\) but no labels"):
        d(torch.from_numpy(x[:2]), 0.5)
    assert d(torch.from_numpy(x[:2]), 0.5, y[:2]).shape == (2, 1, 8, 8)


@pytest.mark.skipif(not os.path.isdir(MODELS), reason="needs ../shared/models")
def test_reference_networks_say_whether_they_are_conditional():
    x = torch.randn(1, 1, 32, 32)
    cond = pm.NetworkDenoiser(load_network(os.path.join(MODELS, "fmnist20k_resnet_zeros_cond", "model.pt")))
    uncond = pm.NetworkDenoiser(load_network(os.path.join(MODELS, "mnist_unet_zeros", "model.pt")))
    assert (cond.num_classes, uncond.num_classes) == (10, 0)
    with pytest.raises(ValueError, match=r"class-conditional \(10 classes\) but no labels"):
        cond(x, 0.5)
    with pytest.raises(ValueError, match="labels were given but the network is unconditional"):
        uncond(x, 0.5, [3])


def test_machine_labels_mismatches():
    plain, cond = pm.ELS(IMGS), pm.ELS(IMGS, LABELS)
    x = RNG.standard_normal((2, 1, 8, 8)).astype(np.float32)
    for call in (lambda: plain.denoise(x, 0.5, 3, [0, 1]), lambda: plain.eps(x, 0.5, 3, [0, 1]),
                 lambda: pm.MachineDenoiser(plain, 3)(x, 0.5, [0, 1]),
                 lambda: pm.ddim(pm.MachineDenoiser(plain, 3), x, [0, 1], steps=2, progress=False)):
        with pytest.raises(ValueError, match="labels were given but this machine was built without training labels"):
            call()
    # documented: a machine built with labels and called without uses all its training images
    assert "all its training images" in pm.ELS.__doc__ and "None uses all training images" in pm.ELS.denoise.__doc__
    assert np.array_equal(cond.denoise(x, 0.5, 3), plain.denoise(x, 0.5, 3))
    assert not np.array_equal(cond.denoise(x, 0.5, 3, [0, 0]), plain.denoise(x, 0.5, 3))


# ------------------------------------------------------------------ found by a review of the API's bad input
def test_bad_times_and_labels_are_named_on_every_path():
    """A NaN among a tensor's times (PCA-locality groups its queries by time: it matched none of them), an unknown
    label under PCA-locality's batch average (a KeyError), and a time list of the wrong length on DataLocal's
    several-times path (a torch broadcasting error): each the error the other machines give."""
    x = RNG.standard_normal((2, 1, 8, 8))
    pca = pm.PCALocality(IMGS.astype(np.float64), LABELS)
    for t in (torch.tensor([0.5, float("nan")]), np.array([0.5, 0.0]), [0.5, 2.0]):
        with pytest.raises(ValueError, match=r"t must lie in \(0, 1\], got"):
            pca.denoise(x, t)
    batched = pm.PCALocality(IMGS.astype(np.float64), LABELS, batch_average=4)
    for labels in ([0, 5], [0, -1]):
        with pytest.raises(ValueError, match=f"label {labels[1]} has no training images"):
            batched.denoise(x, 0.5, labels=labels)
    local = pm.DataLocal(IMGS)
    for t in ([0.3, 0.5, 0.7], torch.tensor([0.3, 0.5, 0.7]), np.array([[0.3, 0.5]])):
        with pytest.raises(ValueError, match=r"t must be a float or have shape \(2,\)"):
            local.denoise(x, t, 3)
    both = local.denoise(x, [0.3, 0.5], 3)  # one call per time, the rows back in order
    assert np.array_equal(both[1:], local.denoise(x[1:], 0.5, 3))


def test_machine_denoiser_refuses_a_patch_size_it_would_truncate():
    els, pspc = pm.ELS(IMGS), pm.PSPC(IMGS)
    for k in (3.5, 3.0, True):
        with pytest.raises(TypeError, match="the patch size k must be an int or a KSchedule"):
            pm.MachineDenoiser(els, k)
    with pytest.raises(ValueError, match="odd positive integer, got 4"):
        pm.MachineDenoiser(els, 4)
    with pytest.raises(TypeError, match="the patch size p must be an int"):
        pm.MachineDenoiser(pspc, 2.9)
    with pytest.raises(ValueError, match="p must be a positive int, got 0"):
        pm.MachineDenoiser(pspc, 0)
    assert pm.MachineDenoiser(els, np.int64(5)).k_at(0.5) == 5 and pm.MachineDenoiser(pspc, 2).k_at(0.5) == 2


@pytest.mark.parametrize("case", ["ls", "pspc", "scfdm"])
def test_a_call_over_the_memory_limit_is_refused_before_its_tables_and_draws(case, monkeypatch):
    """LS's element table, PSPC's table of crops and the smoothed denoiser's draws were made before the limit was
    checked (LS did not check its table at all): hundreds of MB before a refusal, or none. Now the refusal comes
    first: the functions that make them fail the test if called."""
    def made(*args, **kwargs):
        raise AssertionError("made before the memory check")

    rng = np.random.default_rng(0)
    if case == "ls":
        monkeypatch.setattr(pm.ops, "patch_table", made)
        m, x, k = pm.LS(rng.uniform(-1, 1, (2, 1, 64, 64)), max_memory=20 << 20), rng.standard_normal((1, 1, 64, 64)), 63
        what = "element table of 4096 rows of 1x63x63"
    elif case == "pspc":
        monkeypatch.setattr(pm.ops, "window_table", made)
        m, x, k = pm.PSPC(rng.uniform(-1, 1, (2, 3, 96, 96)), max_memory=20 << 20), rng.standard_normal((1, 3, 96, 96)), 48
        what = "PSPC.denoise on a batch of shape"
    else:
        monkeypatch.setattr(pm.ops, "seeded_draws", made)
        m, x, k = pm.SmoothedCFDM(IMGS, samples=200_000, max_memory=50 << 20), rng.standard_normal((2, 1, 8, 8)), None
        what = "200000 draws"
    with pytest.raises(pm.ResourceError, match=what):
        m.denoise(x, 0.5, k)
    with pytest.raises(pm.ResourceError):  # and check_request, which says so from the shape alone
        m.check_request(x.shape, torch.float64, k=k)
    if case == "ls":
        with pytest.raises(pm.ResourceError, match="LS.denoise's element table"):
            pm.LS(rng.uniform(-1, 1, (2, 1, 64, 64)), max_memory=300 << 20).check_request((1, 1, 64, 64), k=63)


def test_max_memory_is_none_or_a_positive_number_of_bytes_everywhere():
    """0 and -1 meant "no limit" to some machines and "refuse everything" to others; a string failed in int()."""
    for machine in (pm.ELS, pm.LS, pm.IS, pm.Wiener, pm.DataLocal, pm.PCALocality, pm.PSPC, pm.SmoothedCFDM):
        for bad, err in ((0, ValueError), (-1, ValueError), (float("nan"), ValueError), ("1G", TypeError),
                         (True, TypeError)):
            with pytest.raises(err, match="max_memory must be None or a"):
                machine(IMGS, max_memory=bad)
        assert machine(IMGS, max_memory=1.5e9).max_memory == 1_500_000_000


def test_a_schedule_callable_outside_zero_one_is_named_not_clipped():
    x = RNG.standard_normal((2, 1, 8, 8))
    for value in (float("nan"), 2.0, -0.5):
        m = pm.ELS(IMGS, schedule=lambda t, v=value: np.full_like(t, v))
        for t in (0.5, torch.tensor([0.5, 0.6])):
            with pytest.raises(ValueError, match=r"must return alpha_bar\(t\) in \[0, 1\], got"):
                m.denoise(x, t, 3)
    ok = pm.ELS(IMGS, schedule=lambda t: np.cos(np.asarray(t) * np.pi / 2) ** 2)
    assert np.isfinite(ok.denoise(x, 0.5, 3)).all()


def test_data_local_names_its_statistics_when_they_hold_nan():
    stats = IMGS.copy()
    stats[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="statistics contains NaN or infinite values"):
        pm.DataLocal(IMGS, statistics=stats)


def test_metrics_refuse_pairs_of_different_shapes():
    """numpy broadcast (1, n) against (3, n) into three answers, and (2, 3) against (2, 1); a scalar raised an
    IndexError and summary([]) a TypeError."""
    from patchmosaic.metrics import METRICS, summary

    for fn in METRICS.values():
        for u, v in ((np.zeros((1, 4)), np.ones((3, 4))), (np.zeros((2, 3)), np.zeros((2, 1)))):
            with pytest.raises(ValueError, match="must have the same shape"):
                fn(u, v)
        with pytest.raises(ValueError, match=r"\(M, \.\.\.\) batches"):
            fn(np.float64(1), np.float64(2))
    with pytest.raises(ValueError, match="summary of no values"):
        summary([])
    assert summary([np.nan])["n"] == 0 and summary([1, 2, 3])["median"] == 2


def test_samplers_check_their_arguments_and_each_answer_of_the_denoiser():
    m = pm.ELS(IMGS)
    d = pm.MachineDenoiser(m, 3)
    x1 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="steps must be a positive integer, got inf"):
        pm.ddim(d, x1, steps=float("inf"), progress=False)
    calls = Counting()
    calls.schedule = m.schedule
    with pytest.raises(TypeError, match="callback must be callable"):
        pm.ddim(calls, x1, steps=2, callback=3, progress=False)
    assert calls.calls == 0

    def small(x, t, labels=None):
        return x[:, :, :1, :1]

    def nan(x, t, labels=None):
        return x * float("nan")

    for f, message in ((small, r"returned Tensor of shape \(2, 1, 1, 1\) for images of shape \(2, 1, 8, 8\)"),
                       (nan, "returned NaN or infinite values at step 0")):
        f.schedule = m.schedule
        with pytest.raises(ValueError, match=message):
            pm.ddim(f, x1, steps=2, progress=False)
        with pytest.raises(ValueError, match=message):
            pm.edm_sample(lambda x, s, labels=None: f(x, 0.5), x1, sigmas=pm.edm_sigmas(3), progress=False)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\], got 1.5"):
        pm.from_sigma_denoiser(lambda x, s, labels=None: x)(x1, 1.5)
    with pytest.raises(pm.ResourceError, match="EDM's noise levels for 1000000000000 steps"):
        pm.edm_sigmas(10 ** 12)


def test_schedules_refuse_repeated_times_truncated_sizes_and_unreadable_numbers(tmp_path):
    with pytest.raises(ValueError, match="schedule times must be distinct"):
        pm.KSchedule((0.5, 0.5), (3, 5))
    with pytest.raises(ValueError, match="every k in a k-schedule must be an odd positive integer, got 7.9"):
        pm.KSchedule.constant(7.9, 2)
    assert pm.KSchedule.constant(7, 2).ks == (7, 7)
    path = tmp_path / "s.json"
    path.write_text('{"times": [1.0], "thresholds": [1' + "0" * 400 + "]}")
    with pytest.raises(ValueError, match="s.json: int too large to convert to float"):
        pm.ThresholdSchedule.from_json(str(path))
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="s.json is not a readable JSON threshold schedule: RecursionError"):
        pm.ThresholdSchedule.from_json(str(path))


def test_data_load_refuses_selections_it_would_misread(tmp_path):
    """classes=[] loaded no image, classes=[1.9] class 1, a boolean mask as indices images 0 and 1, limit=2.5 and
    size=0 failed inside numpy or torch, and an array of empty images inside torch."""
    path = str(tmp_path / "a.npz")
    np.savez(path, x_train=np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8),
             y_train=np.arange(6) % 3)
    cases = [(dict(classes=[]), "classes is empty"), (dict(classes=[1.9]), "classes must be integers"),
             (dict(indices=np.arange(6) % 2 == 0), "indices must be integers, got bool"),
             (dict(indices=[6]), r"indices must lie in \[0, 6\)"),
             (dict(limit=2.5), "limit must be a positive integer"), (dict(limit=float("inf")), "limit must be"),
             (dict(size=0), "size must be 'auto', None or an integer side"), (dict(size=10 ** 6), "size must be")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pm.data.load(path, **kwargs)
    with pytest.raises(pm.ResourceError, match="6 images resized to 60000x60000"):
        pm.data.load(path, size=60000)
    assert tuple(pm.data.load(path, classes=[1], limit=np.int64(1))[0].shape) == (1, 1, 32, 32)
    empty = str(tmp_path / "e.npz")
    np.savez(empty, x_train=np.zeros((2, 0, 0), np.uint8), y_train=np.arange(2))
    with pytest.raises(ValueError, match=r"images have no pixels: array of shape \(2, 0, 0\)"):
        pm.data.load(empty)


def test_indexed_denoiser_takes_what_the_machine_takes_and_checks_before_building():
    """float64 queries (documented) were refused by the float32 index; a conditional machine called without labels
    and one int label failed inside numpy and torch; NaN, t = 0, a wrong canvas and an unknown label were found
    only after the index was built; IS and PSPC were accepted until the first call."""
    imgs = torch.from_numpy(IMGS)
    m = pm.ELS(imgs, LABELS)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    d = pm.IndexedDenoiser(m, 3, kind="flat")
    for bad, err, message in ((x * float("nan"), ValueError, "x contains NaN"), (x[:, :, :7], ValueError,
                              "serve queries of 8x8")):
        with pytest.raises(err, match=message):
            d(bad, 0.5, [0, 1])
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\], got 0.0"):
        d(x, 0.0, [0, 1])
    with pytest.raises(ValueError, match="label 5 has no training images"):
        d(x, 0.5, [0, 5])
    assert d.indexes == {}  # nothing built for the refused calls
    y64 = d(x.double(), 0.5, [0, 1])
    assert y64.dtype == torch.float64 and torch.allclose(y64, m.denoise(x.double(), 0.5, 3, [0, 1]), atol=1e-4)
    assert d(x.double().numpy(), 0.5, [0, 1]).dtype == np.float64
    assert torch.equal(d(x, 0.5), m.denoise(x, 0.5, 3)) and d.record[-1]["used"] == "exact"  # no labels: exact
    mixed = pm.IndexedDenoiser(m, 3, kind="flat", tol=0.0, max_exact_fraction=1.0)
    assert torch.allclose(mixed(x, 0.5, 1), m.denoise(x, 0.5, 3, 1), atol=1e-5)
    with pytest.raises(ValueError, match="kind must be one of"):
        pm.IndexedDenoiser(m, 3, kind="bogus")
    for machine in (pm.IS(IMGS), pm.PSPC(IMGS)):
        with pytest.raises(ValueError, match="no key set of patches"):
            pm.IndexedDenoiser(machine, None if isinstance(machine, pm.IS) else 3)
    for canvas in ((10 ** 9, 10 ** 9), (-8, 8), (8.5, 8), (8,)):
        with pytest.raises(ValueError, match=r"canvas must be None or \(Hq, Wq\)"):
            pm.PatchIndex(m, 3, canvas=canvas)


def test_compare_and_calibrate_refuse_what_would_fail_after_the_network_has_run(tmp_path):
    """Each of these failed only after the network's whole trajectory (or with an AttributeError): a blend part that
    does not know a label, an unknown backend, out_dir a file, info that JSON cannot hold, a machine list instead of
    a dict, a MachineDenoiser where calibrate takes the machine; and float labels were truncated."""
    from patchmosaic.experiments.calibrate import calibrate
    from patchmosaic.experiments.compare import compare

    class Net(torch.nn.Module):
        calls = 0

        def forward(self, t, x, labels=None):
            Net.calls += 1
            return torch.zeros_like(x)

    imgs = torch.from_numpy(IMGS)
    m = pm.ELS(imgs, LABELS)
    x1 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    d = {"a": pm.MachineDenoiser(m, 3)}
    (tmp_path / "file").write_text("x")
    blend = pm.BlendDenoiser(pm.MachineDenoiser(m, 3), pm.MachineDenoiser(pm.ELS(imgs, LABELS * 0 + 5), 3), 0.5)
    cases = [(lambda: compare(Net(), {"b": blend}, x1, [0, 1], steps=2, progress=False), ValueError,
              "label 0 has no training images"),
             (lambda: compare(Net(), d, x1, [0.7, 1.9], steps=2, progress=False), TypeError, "labels must be integers"),
             (lambda: compare(Net(), list(d.values()), x1, [0, 1], steps=2, progress=False), TypeError,
              "machines must be a dict"),
             (lambda: compare(Net(), d, x1, [0, 1], steps=2, out_dir=str(tmp_path / "file"), progress=False),
              ValueError, "is a file, not a folder"),
             (lambda: compare(Net(), d, x1, [0, 1], steps=2, info={"a": object()}, progress=False), TypeError,
              "info must hold JSON-able entries"),
             (lambda: calibrate(Net(), pm.MachineDenoiser(m, 3), x1, [0, 1], steps=2, progress=False), TypeError,
              "calibrate takes the machine itself"),
             (lambda: calibrate(Net(), m, x1, [0.7, 1.9], steps=2, progress=False), TypeError,
              "labels must be integers"),
             (lambda: pm.MachineDenoiser(m, 3, backend="bogus"), ValueError, "unknown backend 'bogus'"),
             (lambda: pm.MachineDenoiser(None, 3), TypeError, "machine must be a machine"),
             (lambda: pm.NetworkDenoiser(Net(), dtype=torch.int64), TypeError, "dtype must be a torch floating"),
             (lambda: compare(Net(), d, x1 * float("nan"), [0, 1], steps=2, progress=False), ValueError,
              "x1 contains NaN"),
             (lambda: calibrate(Net(), m, x1 * float("inf"), [0, 1], steps=2, progress=False), ValueError,
              "x1 contains NaN or infinite"),
             (lambda: pm.PatchIndex(None, 3), TypeError, "a patch index is built over a machine")]
    for call, err, message in cases:
        with pytest.raises(err, match=message):
            call()
    assert Net.calls == 0


def test_a_machine_keeps_its_own_copy_of_the_training_images():
    """A machine kept the caller's tensor (or numpy array) itself but cached converted copies of it: after the
    caller changed it in place, float64 queries used the new images and float32 queries the cached old ones (ELS,
    IS and LS 1.0-1.7 apart). As its docstring says, it now keeps a copy: the caller's later changes do not reach
    it."""
    rng = np.random.default_rng(0)
    for kind, k in ((pm.ELS, 3), (pm.IS, None), (pm.LS, 3), (pm.PCALocality, None)):
        for as_numpy in (False, True):
            base = rng.uniform(-1, 1, (8, 1, 6, 6))
            tr = base.copy() if as_numpy else torch.from_numpy(base.copy())
            m = kind(tr)
            x = rng.standard_normal((2, 1, 6, 6))
            before = m.denoise(x, 0.4, k)
            m.denoise(x.astype(np.float32), 0.4, k)  # (a float32 copy of the images cached)
            tr *= -1
            after64, after32 = m.denoise(x, 0.4, k), m.denoise(x.astype(np.float32), 0.4, k)
            assert np.array_equal(after64, before), kind
            assert np.abs(after32 - after64).max() <= 1e-4, kind
            assert np.array_equal(after64, kind(base).denoise(x, 0.4, k))
