"""The two CNN families, checkpoints (safetensors + JSON) and the resumable training loop."""

import json
import os

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.networks import ResNet, TrainConfig, UNet, build, load, load_network, save, train


def _support(net, x, pix=(8, 8)):
    x = x.clone().requires_grad_(True)
    out = net(torch.full((1,), 0.5), x)
    out[0, 0, pix[0], pix[1]].backward()
    nz = torch.nonzero(x.grad[0, 0].abs() > 0)
    return nz[:, 0].min().item(), nz[:, 0].max().item()


def test_resnet_receptive_field_is_local():
    torch.manual_seed(0)
    net = ResNet(1, 8, depth=3)
    lo, hi = _support(net, torch.randn(1, 1, 24, 24), (12, 12))
    assert hi - lo + 1 <= net.receptive_field == 11


def test_circular_resnet_is_translation_equivariant():
    torch.manual_seed(0)
    net = ResNet(1, 8, depth=2, padding="circular").eval()
    x = torch.randn(2, 1, 12, 12)
    t = torch.full((2,), 0.3)
    with torch.no_grad():
        a = torch.roll(net(t, x), (3, -5), (2, 3))
        b = net(t, torch.roll(x, (3, -5), (2, 3)))
    assert torch.allclose(a, b, atol=1e-5)


def test_unet_attention_makes_it_global():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32)
    lo, hi = _support(UNet(1, (4, 8, 16), attention=True), x, (2, 2))
    assert hi == 31  # a corner output pixel depends on the opposite corner


def test_unet_shapes_and_conditioning():
    net = UNet(3, (4, 8, 16), num_classes=5)
    t = torch.rand(2)
    x = torch.randn(2, 3, 16, 16)
    assert net(t, x, torch.tensor([0, 4])).shape == x.shape
    with pytest.raises(ValueError, match="divisible by 4, got 10x10"):
        net(t, torch.randn(2, 3, 10, 10))


def test_bad_network_configs():
    with pytest.raises(ValueError, match="padding"):
        ResNet(1, 8, 2, padding="reflect")
    with pytest.raises(ValueError, match="architecture"):
        build({"arch": "transformer"})
    with pytest.raises(ValueError, match="bad resnet config"):
        build({"arch": "resnet", "colour": 3})


def test_checkpoint_round_trip_without_pickle(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    net = UNet(1, (4, 8, 16), num_classes=3, attention=True)
    save(str(tmp_path), net, info={"note": "x"})
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["config"])["attention"] is True
    assert json.load(open(tmp_path / "config.json"))["network"]["arch"] == "unet"
    back, info, _ = load(str(tmp_path))
    assert info == {"note": "x"}
    for (k, v), (k2, v2) in zip(net.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert type(load_network(str(tmp_path / "model.safetensors"))) is UNet


def test_load_network_errors(tmp_path):
    with pytest.raises(ValueError, match="no network"):
        load_network(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="TorchScript"):
        load_network(str(bad))
    with pytest.raises(ValueError, match="no checkpoint"):
        load_network(str(tmp_path))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.arange(40) % 4


def test_training_reduces_the_loss_and_resumes_bitwise(tmp_path):
    x, y = _data()
    cfg = dict(batch_size=8, checkpoint_every=10, log_every=5, lr=2e-3)
    torch.manual_seed(0)
    a = train(ResNet(1, 8, 1, num_classes=4), x, y, out=str(tmp_path / "a"),
              config=TrainConfig(steps=60, **cfg), progress=False)
    torch.manual_seed(0)
    net = ResNet(1, 8, 1, num_classes=4)
    train(net, x, y, out=str(tmp_path / "b"), config=TrainConfig(steps=30, **cfg), progress=False)
    b = train(net.config, x, y, out=str(tmp_path / "b"), config=TrainConfig(steps=60, **cfg), progress=False)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)
    losses = load(str(tmp_path / "a"))[1]["losses"]
    assert [s for s, _, _ in losses] == list(range(5, 61, 5))
    assert losses[-1][2] < losses[0][2]
    # the resumed run's loss record goes on from the checkpoint's: the same smoothed losses (the smoothing once
    # restarted at the resumed step), its seconds never running backwards (they once restarted at 0)
    resumed = load(str(tmp_path / "b"))[1]["losses"]
    assert [(s, v) for s, _, v in resumed] == [(s, v) for s, _, v in losses]
    assert all(p[1] <= q[1] for p, q in zip(resumed, resumed[1:])), resumed


def test_training_rejects_bad_input(tmp_path):
    x, y = _data()
    with pytest.raises(ValueError, match="needs labels"):
        train(ResNet(1, 4, 1, num_classes=4), x, out=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="3 channels"):
        train(ResNet(3, 4, 1), x, out=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="labels must lie"):
        train(ResNet(1, 4, 1, num_classes=2), x, y, out=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="positive"):
        train(ResNet(1, 4, 1), x, out=str(tmp_path), config=TrainConfig(steps=0), progress=False)
    train(ResNet(1, 4, 1), x, out=str(tmp_path / "c"), config=TrainConfig(steps=2), progress=False)
    with pytest.raises(ValueError, match="different network"):
        train(ResNet(1, 8, 1), x, out=str(tmp_path / "c"), config=TrainConfig(steps=4), progress=False)


def test_a_checkpoint_with_corrupt_metadata_names_its_file_and_the_problem(tmp_path):
    """Rewritten metadata used to surface as 'Error(s) in loading state_dict for ResNet:' (the first line of torch's
    message), "'NoneType' object is not iterable" or a bare JSON error."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    net = build({"arch": "resnet", "channels": 1, "width": 4, "depth": 1, "padding": "zeros", "num_classes": 0})
    save(str(tmp_path / "ok"), net)
    with safe_open(str(tmp_path / "ok" / "model.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    cases = {"channels": (dict(meta, config=json.dumps(dict(cfg, channels=3))),
                          r"does not match its config .*size mismatch for conv_in.weight"),
             "null": (dict(meta, config="null"), "unreadable network config: a JSON object was expected, got 'null'"),
             "list": (dict(meta, config="[1, 2]"), "unreadable network config: a JSON object was expected"),
             "info": (dict(meta, info="{bad"), "unreadable training information in its metadata"),
             "arch": (dict(meta, config=json.dumps(dict(cfg, arch="vit"))), "unknown network architecture 'vit'")}
    for name, (m, message) in cases.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(tensors, path, metadata=m)
        with pytest.raises(ValueError, match=message) as e:
            load(path)
        assert path in str(e.value) and "\n" not in str(e.value)
    # a training checkpoint whose loss record cannot be gone on from: named when the run resumes
    x = np.random.default_rng(0).uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32)
    out = str(tmp_path / "run")
    train(net.config, x, out=out, config=TrainConfig(steps=2, batch_size=4), progress=False)
    with safe_open(out + "/model.safetensors", framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for key, value, message in (("running_loss", "NaN", "running_loss must be a finite number, got nan"),
                                ("elapsed", "-3", "elapsed seconds must be a finite number >= 0, got -3")):
        info = json.loads(meta["info"])
        info[key] = json.loads(value)
        save_file(tensors, out + "/model.safetensors", metadata=dict(meta, info=json.dumps(info)))
        with pytest.raises(ValueError, match=message):
            train(net.config, x, out=out, config=TrainConfig(steps=4, batch_size=4), progress=False)


def test_training_that_cannot_fit_in_memory_is_refused_before_it_starts(tmp_path):
    """A batch of a million images (141 GiB) or a 4096-wide, 1024-deep ResNet (about 4 TiB) ran until the machine's
    memory was gone; the estimate comes from the network built on the meta device, and matches the real use."""
    from patchmosaic.networks.train import train_bytes

    x = np.random.default_rng(0).uniform(-1, 1, (20, 1, 8, 8)).astype(np.float32)
    small = {"arch": "resnet", "channels": 1, "width": 8, "depth": 1, "padding": "zeros", "num_classes": 0}
    for cfg, batch in ((small, 10 ** 7), (dict(small, width=4096, depth=1024), 4)):
        with pytest.raises(pm.ResourceError, match="training this network .* needs about"):
            train(cfg, x, out=str(tmp_path / "never"), config=TrainConfig(steps=2, batch_size=batch), progress=False)
    assert not (tmp_path / "never").exists()
    # the estimate: parameters five times, and what the forward pass keeps (64 x 8x8 activations per layer)
    params = sum(p.numel() for p in build(small).parameters())
    est = train_bytes(small, 32, (1, 8, 8))
    assert 20 * params + 4 * 32 * 8 * 64 < est < 20 * params + 4 * 32 * 8 * 64 * 40


def test_numpy_numbers_in_the_train_config_are_stored_as_python_numbers(tmp_path):
    """steps=np.int64(50) and the like trained up to the first checkpoint, then failed to write it as JSON (a numpy
    seed failed at once); they are stored as the Python numbers they equal and train as those do."""
    x = np.random.default_rng(0).uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
    cfg = {"arch": "resnet", "channels": 1, "width": 4, "depth": 1, "padding": "zeros", "num_classes": 0}
    given = TrainConfig(steps=np.int64(3), batch_size=np.int32(4), lr=np.float32(1e-3), seed=np.int64(3),
                        ema_decay=np.float64(0.9), checkpoint_every=np.int16(2))
    a = train(dict(cfg), x, out=str(tmp_path / "a"), config=given, progress=False)
    used = load(str(tmp_path / "a"))[1]["train"]["config"]
    assert (type(used["steps"]), type(used["seed"]), type(used["lr"])) == (int, int, float)
    assert used["lr"] == float(np.float32(1e-3)) and used["seed"] == 3 and used["checkpoint_every"] == 2
    b = train(dict(cfg), x, out=str(tmp_path / "b"), progress=False,
              config=TrainConfig(steps=3, batch_size=4, lr=float(np.float32(1e-3)), seed=3, ema_decay=0.9,
                                 checkpoint_every=2))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_train_schedule_is_a_known_name_or_its_schedule(tmp_path):
    """A callable schedule trained to the first checkpoint, then failed to write it; a Schedule object was recorded
    without its kind, and resuming with the very same object was refused as another schedule."""
    from patchmosaic.schedules import Linear, get_schedule

    x = np.random.default_rng(0).uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
    cfg = {"arch": "resnet", "channels": 1, "width": 4, "depth": 1, "padding": "zeros", "num_classes": 0}
    lin = get_schedule("linear")
    out = str(tmp_path / "a")
    train(dict(cfg), x, out=out, config=TrainConfig(steps=2, batch_size=4, schedule=lin), progress=False)
    assert load(out)[1]["train"]["config"]["schedule"] == "linear"
    train(dict(cfg), x, out=out, config=TrainConfig(steps=4, batch_size=4, schedule=lin), progress=False)
    assert load(out)[1]["step"] == 4
    for bad in (lambda t: np.cos(t * np.pi / 2) ** 2, Linear(beta_min=0.5), "cosine_new", None):
        with pytest.raises(ValueError, match="schedule must name a schedule of the package "
                                             r"\(cosine_legacy, cosine, linear;"):
            train(dict(cfg), x, out=str(tmp_path / "bad"), config=TrainConfig(steps=2, batch_size=4, schedule=bad),
                  progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_network_denoiser_runs_the_network_in_its_dtype():
    """NetworkDenoiser(dtype=torch.float64) cast the images but not the network ("Input type (double) and bias type
    (float) should be the same"), and a network cast to float64 failed in its float32 time embedding. A network in
    float64 now runs in float64; a dtype its weights do not have, or a TorchScript network outside float32, is
    refused when the denoiser is made."""
    from conftest import scripted

    torch.manual_seed(0)
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    t = np.array([0.1, 0.5, 0.9])
    for net in (ResNet(1, 8, 2, num_classes=4), UNet(1, (4, 8), attention=True, num_classes=4)):
        y = torch.tensor([0, 3, 1])
        ref = pm.NetworkDenoiser(net).eps(x, t, y)
        net64 = build(net.config)
        net64.load_state_dict(net.state_dict())
        den = pm.NetworkDenoiser(net64.double(), dtype=torch.float64)
        out = den.eps(x, t, y)
        assert out.dtype == torch.float64 and den(x, t, y).dtype == torch.float64
        assert torch.allclose(out, ref, rtol=0, atol=1e-5) and not torch.equal(out, ref)
        with torch.no_grad():  # the network itself ran in float64, its time embedding too
            assert torch.equal(out, net64(torch.tensor(t, dtype=torch.float32), x, y))
            assert net64.embed(torch.tensor(t), y).dtype == torch.float64
        with pytest.raises(ValueError, match=r"dtype=torch.float64\): the network runs in dtype, but its weights are "
                                             r"torch.float32; cast the network first \(net.to\(torch.float64\)\)"):
            pm.NetworkDenoiser(net, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"dtype=torch.float32\): .* its weights are torch.float64"):
            pm.NetworkDenoiser(net64)
        with pytest.raises(ValueError, match="a TorchScript network runs in torch.float32 only .*patchmosaic convert"):
            pm.NetworkDenoiser(scripted(net), dtype=torch.bfloat16)
        assert torch.allclose(pm.NetworkDenoiser(scripted(net)).eps(x, t, y), ref, rtol=0, atol=1e-6)
