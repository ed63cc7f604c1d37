"""Comparison metrics (spec section 5) and the resumable comparison run."""

import json
import os

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.experiments.compare import compare, nearest_training
from patchmosaic.metrics import mse, pearson_r, r2, summary


def test_metrics_on_known_cases():
    rng = np.random.default_rng(0)
    u = rng.standard_normal((3, 2, 5, 5))
    assert np.allclose(pearson_r(u, 2 * u + 3), 1) and np.allclose(pearson_r(u, -u), -1)
    assert np.allclose(r2(u, u), 1) and np.allclose(mse(u, u), 0)
    # R2 of the image's own mean is 0; pearson r is not the square root of R2 in general
    assert np.allclose(r2(u, np.broadcast_to(u.reshape(3, -1).mean(1)[:, None, None, None], u.shape)), 0)
    v = u + 0.5 * rng.standard_normal(u.shape)
    uf, vf = u.reshape(3, -1), v.reshape(3, -1)
    assert np.allclose(pearson_r(u, v), [np.corrcoef(a, b)[0, 1] for a, b in zip(uf, vf)])
    assert np.allclose(mse(u, v), ((uf - vf) ** 2).mean(1))
    s = summary([1, 2, 3, 4, 5])
    assert s["median"] == 3 and s["q25"] == 2 and s["q75"] == 4 and s["n"] == 5


class MachineNet(torch.nn.Module):
    def __init__(self, machine, k):
        super().__init__()
        self.machine, self.k = machine, k

    def forward(self, t, x, labels=None):
        return self.machine.eps(x, float(t[0]), self.k, labels=labels)


def _setup():
    rng = np.random.default_rng(1)
    train = rng.uniform(-1, 1, (20, 1, 8, 8)).astype(np.float32)
    lab = np.arange(20) % 2
    els, iss = pm.ELS(train, lab), pm.IS(train, lab)
    x1 = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1, 1])
    return train, lab, els, iss, x1, y


def test_a_machine_compared_with_itself_is_perfect(tmp_path):
    train, lab, els, iss, x1, y = _setup()
    rep = compare(MachineNet(els, 5), {"ELS": pm.MachineDenoiser(els, 5), "LS3": pm.MachineDenoiser(els, 3),
                                       "IS": pm.MachineDenoiser(iss)}, x1, y, steps=6, batch_size=2,
                  out_dir=str(tmp_path), progress=False)
    s = rep["summary"]
    assert s["ELS"]["r"]["median"] > 1 - 1e-5 and s["ELS"]["R2"]["median"] > 1 - 1e-5
    assert s["ELS"]["mse"]["median"] < 1e-9
    assert s["ELS"]["frac_beats_IS_r"] == 1.0 and "frac_beats_IS_r" not in s["IS"]
    on_disk = json.load(open(tmp_path / "report.json"))
    assert on_disk["per_seed"]["LS3"]["r"] == rep["per_seed"]["LS3"]["r"]
    assert on_disk["per_seed"]["ELS"]["machine"] == {"type": "ELS", "train_images": 20, "boundary": "zeros", "k": 5}
    # the IS samples are training images of the seed's class
    near = nearest_training(rep["samples"]["IS"], torch.from_numpy(train), y, lab)
    assert np.all(lab[near] == y.numpy())
    assert torch.allclose(rep["samples"]["IS"], torch.from_numpy(train[near]), atol=1e-4)


def test_a_constant_network_sample_gives_undefined_metrics_and_strict_json(tmp_path):
    train, lab, els, iss, x1, y = _setup()
    constant = pm.MachineDenoiser(pm.IS(torch.full((1, 1, 8, 8), 0.25)))  # one training image: every sample is it
    rep = compare(constant, {"ELS": pm.MachineDenoiser(pm.ELS(train), 3), "IS": pm.MachineDenoiser(pm.IS(train))},
                  x1, steps=3, out_dir=str(tmp_path), progress=False)
    assert torch.all(rep["samples"]["network"] == 0.25)
    assert rep["summary"]["ELS"]["r"]["n"] == 0 and rep["summary"]["ELS"]["frac_beats_IS_r"] is None

    def refuse(token):
        raise ValueError(f"report.json holds {token}, which strict JSON refuses")

    on_disk = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert on_disk["per_seed"]["ELS"]["r"] == [None] * 5 and on_disk["summary"]["ELS"]["r"]["median"] is None


def test_comparison_resumes_from_saved_samples(tmp_path):
    train, lab, els, iss, x1, y = _setup()
    machines = {"ELS": pm.MachineDenoiser(els, 3), "IS": pm.MachineDenoiser(iss)}
    first = compare(MachineNet(els, 5), machines, x1, y, steps=4, out_dir=str(tmp_path), progress=False)

    def broken(*args, **kw):
        raise AssertionError("the network must not run again")

    class BrokenMachine(pm.MachineDenoiser):
        def __call__(self, x, t, labels=None):
            raise AssertionError("the machine must not run again")

    net = MachineNet(els, 5)  # the same network (its class is part of its description), which must not run
    net.forward = broken
    again = compare(net, {"ELS": BrokenMachine(els, 3), "IS": BrokenMachine(iss)}, x1, y, steps=4,
                    out_dir=str(tmp_path), progress=False)
    assert again["per_seed"] == first["per_seed"]


def test_compare_rejects_bad_input():
    train, lab, els, iss, x1, y = _setup()
    net = MachineNet(els, 5)
    with pytest.raises(ValueError, match="at least one machine"):
        compare(net, {}, x1, y, progress=False)
    with pytest.raises(ValueError, match=r"labels must have shape \(5,\)"):
        compare(net, {"IS": pm.MachineDenoiser(iss)}, x1, y[:3], progress=False)
    with pytest.raises(ValueError, match="label 7 has no training images"):
        compare(net, {"IS": pm.MachineDenoiser(iss)}, x1, torch.tensor([7, 0, 0, 0, 0]), steps=2, progress=False)


def test_compare_writes_nothing_to_stderr_without_progress_or_a_terminal(capfd):
    train, lab, els, iss, x1, y = _setup()
    for progress in (False, True):  # True: stderr here is not a terminal, so the bars stay silent too
        compare(MachineNet(els, 3), {"IS": pm.MachineDenoiser(iss)}, x1, y, steps=2, batch_size=2,
                progress=progress)
        assert capfd.readouterr().err == ""


def test_compare_progress_is_one_bar_per_denoiser_on_a_terminal(monkeypatch):
    import sys

    from test_figures_and_progress import FakeTerminal

    train, lab, els, iss, x1, y = _setup()
    tty = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", tty)
    compare(MachineNet(els, 3), {"IS": pm.MachineDenoiser(iss)}, x1, y, steps=2, batch_size=2, progress=False)
    assert tty.getvalue() == ""
    compare(MachineNet(els, 3), {"IS": pm.MachineDenoiser(iss)}, x1, y, steps=2, batch_size=2, progress=True)
    text = tty.getvalue()
    assert "network" in text and "IS" in text and "10/10" in text and "seeds 4..4 of 5" in text
    assert "ddim" not in text  # the sampler's own bar is folded into the denoiser's


def test_compare_device_argument():
    """``device="cpu"`` gives today's samples bit for bit; a CUDA device on a torch without CUDA is refused by name."""
    train, lab, els, iss, x1, y = _setup()
    machines = {"ELS": pm.MachineDenoiser(els, 3)}
    a = compare(MachineNet(els, 5), machines, x1, y, steps=3, batch_size=2, progress=False)
    b = compare(MachineNet(els, 5), machines, x1, y, steps=3, batch_size=2, progress=False, device="cpu")
    assert torch.equal(a["samples"]["ELS"], b["samples"]["ELS"]) and a["samples"]["ELS"].device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda' asks for a CUDA device"):
            compare(MachineNet(els, 5), machines, x1, y, steps=2, progress=False, device="cuda")


def test_a_sample_file_of_another_run_is_refused_before_any_sampling(tmp_path):
    """A corrupt or stale samples_<name>.npz was found only when compare reached that machine, after the network
    and the machines before it had been sampled; now every file is read before the first step."""
    train, lab, els, iss, x1, y = _setup()

    class Counted(torch.nn.Module):
        calls = 0

        def forward(self, t, x, labels=None):
            Counted.calls += 1
            return torch.zeros_like(x)

    machines = {"ELS": pm.MachineDenoiser(els, 3), "IS": pm.MachineDenoiser(iss)}
    (tmp_path / "samples_IS.npz").write_text("not a state file")
    with pytest.raises(ValueError, match="samples_IS.npz is not a readable state file"):
        compare(Counted(), machines, x1, y, steps=2, out_dir=str(tmp_path), progress=False)
    np.savez(tmp_path / "samples_IS.npz", fingerprint=np.array("another run"), samples=np.zeros(1), done=np.array(0))
    with pytest.raises(ValueError, match="samples_IS.npz is the state of a different run"):
        compare(Counted(), machines, x1, y, steps=2, out_dir=str(tmp_path), progress=False)
    assert Counted.calls == 0 and sorted(os.listdir(tmp_path)) == ["samples_IS.npz"]


def test_a_run_resumed_with_another_batch_size_is_refused_before_any_sampling(tmp_path):
    """A network's outputs depend on the batch they run in (here by design: it adds the batch's size); a
    comparison stopped after two batches of 2 seeds and rerun with batches of 5 went on silently, and its samples
    matched neither an uninterrupted run with 2 nor one with 5. Now the sample file records its batch size and
    a resume with another is refused by name before any call; with the same size it equals the uninterrupted run."""
    train, lab, els, iss, x1, y = _setup()

    class BatchDependent(torch.nn.Module):
        calls, stop_after = 0, None

        def forward(self, t, x, labels=None):
            BatchDependent.calls += 1
            if BatchDependent.stop_after is not None and BatchDependent.calls > BatchDependent.stop_after:
                raise KeyboardInterrupt
            return els.eps(x, float(t[0]), 3, labels=labels) + 1e-3 * x.shape[0]

    machines = {"IS": pm.MachineDenoiser(iss)}
    kw = dict(steps=2, progress=False)
    whole = compare(BatchDependent(), machines, x1, y, batch_size=2, out_dir=str(tmp_path / "whole"), **kw)
    BatchDependent.calls, BatchDependent.stop_after = 0, 4  # two batches of 2 seeds, 2 steps each
    with pytest.raises(KeyboardInterrupt):
        compare(BatchDependent(), machines, x1, y, batch_size=2, out_dir=str(tmp_path / "run"), **kw)
    BatchDependent.calls, BatchDependent.stop_after = 0, None
    with pytest.raises(ValueError, match=r"samples_network.npz holds samples made 2 seeds at a time, and this run "
                                         r"asks for 5 .*batch_size=2 \(CLI: --batch 2\)"):
        compare(BatchDependent(), machines, x1, y, batch_size=5, out_dir=str(tmp_path / "run"), **kw)
    assert BatchDependent.calls == 0
    resumed = compare(BatchDependent(), machines, x1, y, batch_size=2, out_dir=str(tmp_path / "run"), **kw)
    assert BatchDependent.calls == 2  # the last seed only: one batch of 1, two steps
    assert torch.equal(resumed["samples"]["network"], whole["samples"]["network"])
    again = compare(BatchDependent(), machines, x1, y, batch_size=5, out_dir=str(tmp_path / "run"), **kw)
    assert BatchDependent.calls == 2 and torch.equal(again["samples"]["network"], whole["samples"]["network"])
    # (a finished file is read whatever the batch size: nothing is sampled again)
    BatchDependent.calls, BatchDependent.stop_after = 0, 2
    with pytest.raises(KeyboardInterrupt):
        compare(BatchDependent(), machines, x1, y, batch_size=2, out_dir=str(tmp_path / "old"), **kw)
    old = tmp_path / "old" / "samples_network.npz"
    np.savez(old, **{k: v for k, v in np.load(old).items() if k != "batch_size"})  # (as an earlier version wrote)
    with pytest.raises(ValueError, match="samples_network.npz does not record the batch size"):
        compare(BatchDependent(), machines, x1, y, batch_size=2, out_dir=str(tmp_path / "old"), **kw)
