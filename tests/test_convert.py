"""TorchScript eps networks as this package's checkpoints: ``patchmosaic convert`` and
:func:`patchmosaic.networks.convert.convert` give a network of the package's own families that computes the same
eps as the TorchScript module; the reference networks of ../shared/models convert exactly."""

import os
import warnings

import pytest
import torch

from patchmosaic.experiments.cli import main
from patchmosaic.networks import ResNet, UNet, load, load_network
from patchmosaic.networks.convert import convert, torchscript_config

from conftest import SHARED, scripted

MODELS = os.path.join(SHARED, "models")


def _eps(net, channels, classes, n=5):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, channels, 32, 32, generator=gen)
    t = torch.linspace(0.05, 1.0, n)
    y = torch.arange(n) % classes if classes else None
    with torch.no_grad():
        return net(t, x, y)


@pytest.mark.parametrize("make", [
    lambda: ResNet(1, 8, 2, padding="circular"),
    lambda: ResNet(3, 8, 1, num_classes=4, emb_dim=12),
    lambda: UNet(1, (4, 8, 16), num_classes=3),
    lambda: UNet(3, (4, 8, 16), attention=True, embed_at="input", num_classes=2),
])
def test_a_scripted_network_converts_to_the_same_eps(tmp_path, make):
    torch.manual_seed(0)
    net = make().eval()
    path = str(tmp_path / "model.pt")
    scripted(net).save(path)
    info = convert(path, str(tmp_path / "out"))
    assert info["config"] == net.config and info["check"]["max_abs_eps_difference"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the converted network loads without TorchScript (no deprecation warning)
        back, stored, _ = load(str(tmp_path / "out"))
    assert stored["sha256"] == info["sha256"] and not isinstance(back, torch.jit.ScriptModule)
    c, k = net.config["channels"], net.config["num_classes"]
    assert torch.equal(_eps(back, c, k), _eps(net, c, k))


def test_convert_command_and_its_errors(tmp_path, capsys):
    path = str(tmp_path / "model.pt")
    scripted(ResNet(1, 4, 1)).save(path)
    assert main(["convert", path, str(tmp_path / "out")]) == 0
    assert "eps agrees" in capsys.readouterr().out
    assert load_network(str(tmp_path / "out")).config["width"] == 4
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "o2")]) == 2
    assert "no TorchScript file at" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a module")
    assert main(["convert", str(tmp_path / "junk.pt"), str(tmp_path / "o3")]) == 2
    assert "neither a patchmosaic checkpoint nor a TorchScript module" in capsys.readouterr().err
    other = str(tmp_path / "other.pt")
    scripted(torch.nn.Linear(2, 2)).save(other)
    assert main(["convert", other, str(tmp_path / "o4")]) == 2
    assert "not a ResNet or UNet of patchmosaic's families" in capsys.readouterr().err
    assert not (tmp_path / "o4").exists()


def test_unet_embedding_position_is_checked():
    with pytest.raises(ValueError, match="embed_at must be one of"):
        UNet(1, (4, 8), embed_at="output")
    assert "embed_at" not in UNet(1, (4, 8)).config  # the default layout's configs are as before
    assert UNet(1, (4, 8), embed_at="input").config["embed_at"] == "input"


@pytest.mark.skipif(not os.path.isdir(MODELS), reason=f"the reference networks are in {MODELS} (PATCHMOSAIC_SHARED)")
def test_every_reference_network_converts_exactly(tmp_path):
    names = sorted(n for n in os.listdir(MODELS) if os.path.exists(os.path.join(MODELS, n, "model.pt")))
    assert len(names) == 7
    for name in names:
        src = os.path.join(MODELS, name, "model.pt")
        convert(src, str(tmp_path / name))
        ts, net = load_network(src), load_network(str(tmp_path / name))
        cfg = net.config
        assert cfg == torchscript_config(ts) and (cfg["arch"] == "resnet" or cfg["embed_at"] == "input"), name
        assert torch.equal(_eps(net, cfg["channels"], cfg["num_classes"]),
                           _eps(ts, cfg["channels"], cfg["num_classes"])), name
