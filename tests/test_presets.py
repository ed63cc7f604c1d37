"""``patchmosaic train --preset NAME``: a recipe per reference network (checked against its card.json where
../shared is present), small ones on the built-in digits; overrides, the time estimate, the reference samples,
resuming, ``load_network('preset:NAME')`` and their errors. Training here is a few steps of the tiny preset."""

import json
import os

import numpy as np
import pytest

from conftest import SHARED
from patchmosaic.experiments.cli import main
from patchmosaic.networks import load, load_network
from patchmosaic.networks import presets as P

MODELS = os.path.join(SHARED, "models")
TINY = "mnist2k_resnet_tiny"


def test_every_reference_network_has_a_preset():
    reference = [n for n, r in P.presets().items() if r["reference"]]
    assert sorted(reference) == sorted(["mnist_resnet_zeros", "mnist_unet_zeros", "fmnist20k_resnet_zeros_cond",
                                        "cifar10k_resnet_zeros_cond", "mnist_resnet_circular",
                                        "cifar10k_unet_zeros_cond", "cifar10k_unet_attn_zeros_cond"])
    for name, r in P.presets().items():  # every recipe builds its network
        cfg = P.network_config(r, r["channels"], r["num_classes"])
        assert cfg["arch"] == r["network"]["arch"] and (cfg["num_classes"] > 0) == r["conditional"], name
        P.train_config(r)


@pytest.mark.skipif(not os.path.isdir(MODELS), reason=f"the reference networks' cards are in {MODELS}")
def test_reference_presets_follow_their_cards():
    for name in sorted(os.listdir(MODELS)):
        card_file = os.path.join(MODELS, name, "card.json")
        if not os.path.exists(card_file):
            continue
        card, r = json.load(open(card_file)), P.get(name)
        assert r["network"]["arch"] == card["arch"] and r["network"]["padding"] == card["padding"], name
        assert r["conditional"] == card["conditional"], name
        assert (r["train"]["steps"], r["train"]["batch_size"], r["train"]["lr"], r["train"]["seed"]) == \
               (card["steps"], card["batch"], card["lr"], card["seed"]), name
        assert r["reference"]["seconds"] == card["seconds"] and r["reference"]["device"] == card["device"], name
        if card["arch"] == "resnet":
            assert (r["network"]["width"], r["network"]["depth"]) == (card["width"], card["layers"]), name


def test_recipe_overrides_and_their_errors():
    r, changed = P.recipe(TINY, {"steps": 7, "lr": None, "widths": None})
    assert r["train"]["steps"] == 7 and changed == [("steps", 100, 7)]
    r, changed = P.recipe(TINY, {"arch": "unet", "widths": ["8", "16"]})
    assert r["network"] == {"arch": "unet", "widths": [8, 16], "attention": False, "padding": "zeros"}
    assert ("arch", "resnet", "unet") in changed
    with pytest.raises(ValueError, match="unknown preset 'nope'; known: .*mnist_resnet_zeros"):
        P.get("nope")
    with pytest.raises(ValueError, match="unknown setting.*colour"):
        P.recipe(TINY, {"colour": 1})
    with pytest.raises(ValueError, match="widths is not a setting of a resnet"):
        P.recipe(TINY, {"widths": [4, 8]})


def test_train_preset_command_estimates_trains_resumes_and_writes_samples(tmp_path, capsys):
    out = str(tmp_path / "tiny")
    assert main(["train", "--preset", TINY, "--steps", "4", "--out", out, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"preset {TINY} with steps=4 (preset: 100)" in text
    assert "s per step on this machine" in text and "4 steps take about" in text
    net, info, _ = load(out)
    assert info["step"] == 4 and net.config["width"] == 16 and net.config["num_classes"] == 0
    with np.load(os.path.join(out, "ddim20_samples.npz")) as z:
        assert z["seeds"].shape == (128, 1, 32, 32) and z["samples"].shape == (128, 1, 32, 32)
        assert int(z["step"]) == 4 and np.isfinite(z["samples"]).all()
    # resumed to more steps: the estimate counts what is left, the samples follow the new checkpoint
    assert main(["train", "--preset", TINY, "--steps", "6", "--out", out, "--quiet"]) == 0
    assert "2 steps (resuming at step 4)" in capsys.readouterr().out
    with np.load(os.path.join(out, "ddim20_samples.npz")) as z:
        assert int(z["step"]) == 6
    assert load_network(out).config == net.config


def test_preset_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["train", "--preset", TINY, "--widths", "4,8", "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "widths is not a setting of a resnet" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"no trained network of preset {TINY} ships with the package.*"
                                         f"patchmosaic train --preset {TINY} --out DIR"):
        load_network(f"preset:{TINY}")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        load_network("preset:nope")


def test_preset_checkpoints_in_one_folder_keep_their_own_samples_and_config(tmp_path):
    """Two runs saved as .safetensors files in one folder wrote the same ddim20_samples.npz and config.json (the
    second run's samples were not written at all: the file's step matched). Each checkpoint now has its own, and
    the samples are rewritten whenever they are of other weights than the checkpoint's."""
    from patchmosaic.experiments.train_preset import run_preset, write_reference_samples
    from patchmosaic.io.runstate import module_digest

    quiet = dict(progress=False, say=lambda s: None)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    net_a = run_preset(TINY, a, {"steps": 2}, **quiet)["network"]
    net_b = run_preset(TINY, b, {"steps": 2, "width": 8}, **quiet)["network"]
    assert sorted(os.listdir(tmp_path)) == ["a.config.json", "a.ddim20_samples.npz", "a.safetensors",
                                            "b.config.json", "b.ddim20_samples.npz", "b.safetensors"]
    assert [json.load(open(tmp_path / f"{n}.config.json"))["network"]["width"] for n in "ab"] == [16, 8]
    write_reference_samples(net_b, str(tmp_path / "own.npz"), step=2)
    with np.load(tmp_path / "a.ddim20_samples.npz") as za, np.load(tmp_path / "b.ddim20_samples.npz") as zb, \
            np.load(tmp_path / "own.npz") as own:
        assert np.array_equal(zb["samples"], own["samples"]) and int(zb["step"]) == 2
        assert not np.array_equal(za["samples"], zb["samples"]) and str(za["weights"]) == module_digest(net_a)
        old = zb["samples"]
    # another network trained to the same step in its place: its own samples, not the file's
    os.remove(b)
    net = run_preset(TINY, b, {"steps": 2, "width": 8, "seed": 1}, **quiet)["network"]
    with np.load(tmp_path / "b.ddim20_samples.npz") as z:
        assert str(z["weights"]) == module_digest(net) and not np.array_equal(z["samples"], old)


def test_the_docs_claim_no_shipped_network_that_is_not_there():
    """presets.json called mnist2k_resnet_zeros "shipped with the package" and presets.py said that trained networks
    of some presets ship in trained/NAME/, but none does (load_network("preset:NAME") says to train it)."""
    shipped = [name for name in P.names() if P.trained_path(name)]
    for name, r in P.presets().items():
        assert ("shipped" in r["about"]) == (name in shipped), name
    if not shipped:
        assert "none does at present" in P.__doc__ and "none ships at present" in load_network.__doc__
