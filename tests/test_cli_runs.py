"""``patchmosaic train / calibrate / compare`` end to end on a tiny data set, resumable, documented."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from patchmosaic.experiments.cli import build_parser, main
from test_demo_cli import read_png


def read_figure(path):
    """A figure file's format by its first bytes ('png', 'svg' or 'pdf'); a PNG is decoded in full with Pillow."""
    head = open(path, "rb").read(64)
    if head.startswith(b"\x89PNG"):
        with Image.open(path) as im:
            im.load()
            return "png", np.asarray(im)
    if head.startswith(b"%PDF"):
        return "pdf", None
    assert head.lstrip().startswith((b"<?xml", b"<svg")), head
    return "svg", None


@pytest.fixture
def tiny(tmp_path):
    """A tiny npz data set: 40 images 1x8x8 in 4 classes."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y_train=np.arange(40) % 4)
    return str(path)


def test_train_calibrate_compare(tmp_path, tiny, capsys):
    common = ["--data", tiny, "--quiet"]
    net = str(tmp_path / "net")
    assert main(["train", "--arch", "resnet", "--width", "8", "--depth", "1", "--conditional", "--steps", "12",
                 "--batch-size", "8", "--checkpoint-every", "5", "--out", net] + common + ["--limit", "40"]) == 0
    assert os.path.exists(os.path.join(net, "model.safetensors"))
    info = json.load(open(os.path.join(net, "config.json")))
    assert info["info"]["step"] == 12 and info["network"]["num_classes"] == 4
    # rerun with more steps resumes (from step 12)
    assert main(["train", "--width", "8", "--depth", "1", "--conditional", "--steps", "15", "--batch-size", "8",
                 "--out", net] + common) == 0
    assert json.load(open(os.path.join(net, "config.json")))["info"]["step"] == 15

    ks = str(tmp_path / "ks.json")
    assert main(["calibrate", "--network", net, "--seeds", "3", "--steps", "3", "--candidates", "3,5",
                 "--out", ks] + common) == 0
    cal = json.load(open(ks))
    assert len(cal["ks"]) == 3 and set(cal["ks"]) <= {3, 5} and np.array(cal["choices"]).shape == (3, 3)
    assert os.path.exists(ks + ".state.npz")
    assert read_figure(str(tmp_path / "ks.png"))[0] == "png"

    out = str(tmp_path / "cmp")
    assert main(["compare", "--network", net, "--seeds", "3", "--steps", "3", "--machine", f"els={ks}",
                 "--machine", "ls=3", "--out", out] + common) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert set(rep["per_seed"]) == {f"els={ks}", "ls=3", "IS"} and rep["seeds"] == 3
    assert all(len(v["r"]) == 3 for v in rep["per_seed"].values())
    kind, g = read_figure(os.path.join(out, "grid.png"))
    assert kind == "png" and g.shape[0] > g.shape[1]  # 6 rows (noise, network, els, ls, IS, nearest), 3 seeds
    assert read_figure(os.path.join(out, "scatter.png"))[0] == "png"
    text = capsys.readouterr().out
    assert "median r" in text and "beats IS" in text

    # the same runs again (resumed from their state) with figures as SVG and PDF, beside the PNGs
    assert main(["calibrate", "--network", net, "--seeds", "3", "--steps", "3", "--candidates", "3,5",
                 "--out", ks, "--figure-format", "pdf"] + common) == 0
    assert read_figure(str(tmp_path / "ks.pdf"))[0] == "pdf" and json.load(open(ks)) == cal
    assert main(["compare", "--network", net, "--seeds", "3", "--steps", "3", "--machine", f"els={ks}",
                 "--machine", "ls=3", "--out", out, "--figure-format", "svg"] + common) == 0
    assert read_figure(os.path.join(out, "grid.svg"))[0] == "svg"
    assert read_figure(os.path.join(out, "scatter.svg"))[0] == "svg"
    assert "grid.svg, scatter.svg" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare", "--network", net, "--out", out, "--figure-format", "gif"] + common)
    assert "invalid choice: 'gif'" in capsys.readouterr().err

    # --unconditional on this class-conditional network: it runs without its class embedding, on purpose
    with pytest.warns(UserWarning, match="runs a class-conditional network .4 classes. without labels"):
        assert main(["calibrate", "--network", net, "--seeds", "2", "--steps", "2", "--candidates", "3",
                     "--unconditional", "--out", str(tmp_path / "ks_u.json")] + common) == 0
    # --conditional on an unconditional network: refused, naming the option
    plain = str(tmp_path / "plain")
    assert main(["train", "--width", "8", "--depth", "1", "--steps", "2", "--batch-size", "8", "--out", plain]
                + common) == 0
    assert main(["compare", "--network", plain, "--seeds", "2", "--steps", "2", "--conditional",
                 "--out", str(tmp_path / "cmp_c")] + common) == 2
    assert "--conditional: the network" in capsys.readouterr().err


def test_datalocal_and_wiener_from_the_cli(tmp_path, tiny, capsys):
    """The data-driven locality machine calibrates, samples and compares from the CLI; the Wiener filter compares."""
    common = ["--data", tiny, "--quiet"]
    net = str(tmp_path / "net")
    assert main(["train", "--width", "8", "--depth", "1", "--steps", "3", "--batch-size", "8", "--out", net]
                + common) == 0
    ks = str(tmp_path / "ks_dl.json")
    assert main(["calibrate", "--network", net, "--machine", "datalocal", "--seeds", "2", "--steps", "3",
                 "--candidates", "3,5", "--out", ks] + common) == 0
    cal = json.load(open(ks))
    assert cal["machine"] == "datalocal" and set(cal["ks"]) <= {3, 5}
    out = str(tmp_path / "cmp")
    assert main(["compare", "--network", net, "--seeds", "2", "--steps", "3", "--machine", f"datalocal={ks}",
                 "--machine", "wiener", "--out", out] + common) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert set(rep["per_seed"]) == {f"datalocal={ks}", "Wiener", "IS"}
    assert rep["per_seed"][f"datalocal={ks}"]["machine"]["type"] == "DataLocal"
    assert main(["sample", "--machine", "datalocal", "--k", "3", "--n", "2", "--steps", "3",
                 "--out", str(tmp_path / "s.png")] + common) == 0
    capsys.readouterr()
    for bad, msg in ((["--machine", "wiener=3"], "wiener takes no k-schedule"),
                     (["--machine", "datalocal"], "datalocal needs a k-schedule")):
        assert main(["compare", "--network", net, "--seeds", "2", "--steps", "2", "--out", out] + bad + common) == 2
        assert msg in capsys.readouterr().err


def test_bad_cli_input_exits_2_with_one_line(tmp_path, tiny, capsys):
    assert main(["compare", "--network", str(tmp_path / "none.pt"), "--data", tiny, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("patchmosaic compare: error:") and "no network" in err and "\n" not in err
    assert main(["train", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "n")]) == 2
    assert "no data set" in capsys.readouterr().err
    net = str(tmp_path / "net")
    main(["train", "--data", tiny, "--width", "4", "--depth", "1", "--steps", "1", "--out", net, "--quiet"])
    assert main(["compare", "--network", net, "--data", tiny, "--machine", "els", "--out", str(tmp_path / "c")]) == 2
    assert "needs a k-schedule" in capsys.readouterr().err
    assert main(["calibrate", "--network", net, "--data", tiny, "--candidates", "3,4", "--out",
                 str(tmp_path / "k.json")]) == 2
    assert "odd" in capsys.readouterr().err


def test_every_option_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"demo", "train", "calibrate", "compare"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def test_sample_on_a_larger_canvas_from_photo_crops(tmp_path, capsys):
    pytest.importorskip("skimage")
    out = str(tmp_path / "t.png")
    assert main(["sample", "--data", "skimage:brick", "--crop", "16", "--stride", "128", "--canvas", "24x40",
                 "--k", "ramp:7:3", "--n", "2", "--steps", "4", "--out", out, "--quiet"]) == 0
    z = np.load(str(tmp_path / "t.npz"))
    assert z["samples"].shape == (2, 1, 24, 40) and z["provenance_image"].shape == (2, 24, 40)
    assert z["provenance_image"].max() < 16  # 4 x 4 crops of brick
    pic = read_png(out)
    assert pic.shape == (2 * (24 * 2 + 2) + 2, 2 * (40 * 2 + 2) + 2, 3)  # samples row, provenance row (x2)
    assert "24x40" in capsys.readouterr().out


def test_sample_conditional_and_errors(tmp_path, tiny, capsys):
    out = str(tmp_path / "s.png")
    assert main(["sample", "--data", tiny, "--labels", "1,3", "--n", "3", "--steps", "3", "--k", "5",
                 "--out", out, "--quiet"]) == 0
    assert np.load(str(tmp_path / "s.npz"))["labels"].tolist() == [1, 3, 1]
    assert main(["sample", "--data", tiny, "--k", "4", "--out", out, "--quiet"]) == 2
    assert "odd" in capsys.readouterr().err
    assert main(["sample", "--data", tiny, "--canvas", "big", "--out", out]) == 2
    assert "HxW" in capsys.readouterr().err
    assert main(["sample", "--data", tiny, "--machine", "ls", "--canvas", "40x40", "--k", "3", "--out", out]) == 2
    assert "training size" in capsys.readouterr().err
    assert main(["sample", "--data", tiny, "--labels", "9", "--k", "3", "--out", out]) == 2
    assert "label 9 has no training images" in capsys.readouterr().err


def test_kschedule_specs(tmp_path):
    from patchmosaic.diffusion.kschedule import KSchedule, from_spec

    assert from_spec("7", 4).ks == (7, 7, 7, 7)
    assert from_spec("ramp:15:3", 5).ks == (15, 13, 9, 7, 3)
    assert from_spec("paper:MNIST_ResNet_zeros").ks[0] == 15
    KSchedule.constant(5, 3).to_json(str(tmp_path / "k.json"))
    assert from_spec(str(tmp_path / "k.json")).ks == (5, 5, 5)
    with pytest.raises(ValueError, match="ramp:K_FIRST:K_LAST"):
        from_spec("ramp:9")
    with pytest.raises(ValueError, match="neither"):
        from_spec("seven")


def test_sample_refuses_a_large_photograph_without_crop_and_states_size_and_time(tmp_path, capsys):
    """A photograph above 128x128 without --crop or --canvas (one training image, every pixel a key, a canvas
    as large) is refused before the run with its size and the measured estimate; --force runs it."""
    pytest.importorskip("skimage")
    args = ["sample", "--data", "skimage:text", "--n", "1", "--steps", "1", "--k", "3",
            "--out", str(tmp_path / "p.png")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "training images of 172x448 (larger than 128x128) without --crop or --canvas" in err
    assert "1 samples of 172x448 from 1 training image(s)" in err and "patch pairs, roughly" in err and "--force" in err
    assert not (tmp_path / "p.png").exists()
    assert main(args + ["--force"]) == 0
    assert "1 samples of 172x448" in capsys.readouterr().err and (tmp_path / "p.png").exists()
    assert main(["sample", "--data", "skimage:text", "--crop", "32", "--canvas", "40x40", "--n", "1",
                 "--steps", "1", "--k", "3", "--out", str(tmp_path / "c.png")]) == 0
    assert "roughly" not in capsys.readouterr().err


def test_calibrate_refuses_a_figure_path_as_out(tmp_path, tiny, capsys):
    """--out is the k-schedule JSON and the plot is written beside it under OUT's stem: an --out with a figure
    extension (ks.png) would have the plot overwrite the JSON, so it is refused before any work."""
    base = ["calibrate", "--network", str(tmp_path / "net"), "--data", tiny, "--steps", "2", "--quiet"]
    for name, fmt in (("ks.png", "png"), ("ks.SVG", "svg"), ("ks.pdf", "png")):
        out = tmp_path / name
        assert main(base + ["--out", str(out), "--figure-format", fmt]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("patchmosaic calibrate: error: --out is the k-schedule JSON;") and "\n" not in err
        assert "no network" not in err and not out.exists()  # refused before the network was even looked for
    assert not [p for p in os.listdir(tmp_path) if p != "tiny.npz"]
    assert main(base + ["--out", str(tmp_path / "ks.json")]) == 2  # a JSON path passes on to the next check
    assert "no network" in capsys.readouterr().err


def test_pca_locality_and_the_smoothed_denoiser_from_the_cli(tmp_path, tiny, capsys):
    """PCA-locality calibrates its threshold per step and compares from the CLI; the smoothed closed-form denoiser
    compares (machines from the registry: no CLI code of their own)."""
    common = ["--data", tiny, "--quiet"]
    net = str(tmp_path / "net")
    assert main(["train", "--width", "8", "--depth", "1", "--steps", "3", "--batch-size", "8", "--out", net]
                + common) == 0
    th = str(tmp_path / "thresholds.json")
    assert main(["calibrate", "--network", net, "--machine", "pca", "--seeds", "2", "--steps", "3",
                 "--candidates", "0.01,0.1", "--out", th] + common) == 0
    cal = json.load(open(th))
    assert cal["machine"] == "pca" and set(cal["thresholds"]) <= {0.01, 0.1} and "ks" not in cal
    out = str(tmp_path / "cmp")
    assert main(["compare", "--network", net, "--seeds", "2", "--steps", "3", "--machine", f"pca={th}",
                 "--machine", "pca", "--machine", "scfdm", "--out", out] + common) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert set(rep["per_seed"]) == {f"pca={th}", "pca", "scfdm", "IS"}
    assert rep["per_seed"][f"pca={th}"]["machine"]["thresholds"] == cal["thresholds"]
    capsys.readouterr()
    for bad, msg in ((["--machine", "scfdm=3"], "scfdm takes no k-schedule"),
                     (["--machine", "pca=2.0"], "threshold")):
        assert main(["compare", "--network", net, "--seeds", "2", "--steps", "2", "--out", out] + bad + common) == 2
        assert msg in capsys.readouterr().err


def test_blends_calibrate_and_compare_from_the_cli(tmp_path, tiny, capsys):
    """calibrate --blend writes the weight of the first part per step; compare --blend samples the blend with it
    (or a fixed weight); bad blends exit 2 with the problem named."""
    common = ["--data", tiny, "--quiet"]
    net = str(tmp_path / "net")
    assert main(["train", "--width", "8", "--depth", "1", "--steps", "3", "--batch-size", "8", "--out", net]
                + common) == 0
    w = str(tmp_path / "weights.json")
    assert main(["calibrate", "--network", net, "--blend", "els=3+wiener", "--seeds", "2", "--steps", "3",
                 "--candidates", "0,0.5,1", "--out", w] + common) == 0
    cal = json.load(open(w))
    assert cal["blend"] == "els=3+wiener" and len(cal["weights"]) == 3 and set(cal["weights"]) <= {0.0, 0.5, 1.0}
    out = str(tmp_path / "cmp")
    assert main(["compare", "--network", net, "--seeds", "2", "--steps", "3", "--blend", f"els=3+wiener@{w}",
                 "--blend", "els=3+wiener@0.25", "--out", out] + common) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert set(rep["per_seed"]) == {f"els=3+wiener@{w}", "els=3+wiener@0.25", "IS"}
    d = rep["per_seed"][f"els=3+wiener@{w}"]["machine"]
    assert d["type"] == "BlendDenoiser" and d["weights"] == cal["weights"] and d["first"]["ks"] == [3, 3, 3]
    assert d["second"]["type"] == "Wiener"
    capsys.readouterr()
    for bad, msg in ((["--blend", "els=3+wiener"], "FIRST+SECOND@WEIGHT"),
                     (["--blend", "els=3+wiener@1.5"], "weight must be a number in [0, 1]"),
                     (["--blend", "els+wiener@0.5"], "els needs a k-schedule"),
                     (["--blend", "els=3@0.5"], "FIRST+SECOND@WEIGHT")):
        assert main(["compare", "--network", net, "--seeds", "2", "--steps", "2", "--out", out] + bad + common) == 2
        assert msg in capsys.readouterr().err
    for bad, msg in ((["--blend", "els=3+wiener@0.5"], "FIRST+SECOND (e.g."),
                     (["--blend", "els=3+wiener", "--machine", "ls"], "leave out --machine"),
                     (["--blend", "els=3+wiener", "--candidates", "0,2"], "weight")):
        assert main(["calibrate", "--network", net, "--seeds", "2", "--steps", "2", "--out",
                     str(tmp_path / "w2.json")] + bad + common) == 2
        assert msg in capsys.readouterr().err


def test_sample_with_a_machine_without_provenance_and_without_a_parameter(tmp_path, tiny, capsys):
    """`sample --machine scfdm` always failed ('SmoothedCFDM has no provenance': sample asked every machine for it);
    `--k` given to a machine without a per-step parameter was ignored silently (compare refuses it)."""
    out = str(tmp_path / "s.png")
    assert main(["sample", "--data", tiny, "--machine", "scfdm", "--steps", "2", "--samples", "2", "--quiet",
                 "--out", out]) == 0
    with np.load(str(tmp_path / "s.npz")) as z:
        assert z["samples"].shape[:2] == (2, 1) and np.isfinite(z["samples"]).all()
        assert "provenance_image" not in z.files
    capsys.readouterr()
    for machine in ("is", "scfdm"):
        assert main(["sample", "--data", tiny, "--machine", machine, "--k", "5", "--steps", "2", "--quiet",
                     "--out", str(tmp_path / "t.png")]) == 2
        assert f"--k: the {machine} machine takes no k-schedule" in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()


def test_train_says_when_its_checkpoint_is_already_past_steps(tmp_path, tiny, capsys):
    net = str(tmp_path / "net")
    args = ["train", "--data", tiny, "--width", "4", "--depth", "1", "--batch-size", "4", "--quiet", "--out", net]
    assert main(args + ["--steps", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    before = os.path.getmtime(os.path.join(net, "model.safetensors"))
    assert main(args + ["--steps", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"kept {net}: its checkpoint is already at step 4, past --steps 2; " \
                                              "nothing was trained (another --out trains a new network)"
    assert os.path.getmtime(os.path.join(net, "model.safetensors")) == before


def test_compare_prints_its_summary_when_r_is_undefined_on_every_seed(tmp_path, capsys):
    """A network whose every sample is one constant image leaves r undefined on every seed (frac_beats_IS_r None):
    the summary says so (formatting None as a percentage failed at the end of the run)."""
    import math
    from typing import Optional

    import torch

    class ZeroX0(torch.nn.Module):  # eps = x / b under cosine_legacy: x0_hat = 0
        def forward(self, t: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
            b = torch.sin(t.double() / 1.008 * math.pi / 2).reshape(-1, 1, 1, 1)
            return (x.double() / b).to(x.dtype)

    torch.jit.script(ZeroX0()).save(str(tmp_path / "net.pt"))
    np.savez(tmp_path / "flat.npz", x_train=np.full((40, 8, 8), 128, np.uint8), y_train=np.arange(40) % 4)
    rc = main(["compare", "--network", str(tmp_path / "net.pt"), "--data", str(tmp_path / "flat.npz"), "--seeds", "2",
               "--steps", "2", "--machine", "ls=3", "--out", str(tmp_path / "cmp"), "--quiet", "--unconditional"])
    out = capsys.readouterr().out
    assert rc == 0 and "ls=3: median r nan" in out and "r undefined on every seed" in out
    assert json.loads((tmp_path / "cmp" / "report.json").read_text())["summary"]["ls=3"]["frac_beats_IS_r"] is None


def test_train_refuses_the_options_of_the_other_architecture(tmp_path, tiny, capsys):
    """Without --preset, --arch unet --width 64 --depth 9 and --arch resnet --widths 3,5 --attention trained (exit 0)
    with those options unused; they are refused before any work, as with --preset."""
    out = tmp_path / "n"
    for argv, option, arch in ((["--arch", "unet", "--widths", "4,8", "--width", "64", "--depth", "9"], "--width",
                                "unet"),
                               (["--arch", "unet", "--depth", "9"], "--depth", "unet"),
                               (["--width", "4", "--widths", "3,5", "--attention"], "--widths", "resnet"),
                               (["--arch", "resnet", "--no-attention"], "--attention", "resnet")):
        assert main(["train", "--data", tiny, "--steps", "1", "--quiet", "--out", str(out)] + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"patchmosaic train: error: {option} is not an option of a {arch} (its options: ")
        assert err.count("\n") == 1 and not out.exists()


def test_train_messages_name_the_file_written_and_what_is_wrong(tmp_path, tiny, capsys, monkeypatch):
    """--out f.safetensors printed "wrote f.safetensors/model.safetensors"; Ctrl-C during --list-presets crashed in
    the interrupt message; widths that attention cannot split were an internal error (AssertionError) or a GroupNorm
    message not naming widths."""
    import patchmosaic.experiments.train_preset as TP
    import patchmosaic.networks as N
    from patchmosaic.networks import UNet

    f = tmp_path / "f.safetensors"
    args = ["train", "--data", tiny, "--width", "4", "--depth", "1", "--batch-size", "2", "--quiet", "--out", str(f)]
    assert main(args + ["--steps", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {f} (resnet, ") and f.is_file()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(N, "train", interrupted)
    assert main(args + ["--steps", "3"]) == 130
    assert capsys.readouterr().err == f"patchmosaic train: interrupted; the checkpoint of step 1 in {f} is kept: " \
                                      "rerun the same command to resume\n"
    monkeypatch.setattr(TP, "list_presets", interrupted)
    assert main(["train", "--list-presets"]) == 130
    assert capsys.readouterr().err == "patchmosaic train: interrupted; nothing was written\n"
    monkeypatch.undo()
    for widths in ("4,6", "4,12"):
        assert main(["train", "--data", tiny, "--arch", "unet", "--widths", widths, "--attention", "--steps", "1",
                     "--quiet", "--out", str(tmp_path / "u")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("patchmosaic train: error: widths: with attention the last width must be a multiple of "
                              "the 4 attention heads and, above 8, of the 8 GroupNorm groups (e.g. 8), got widths")
        assert err.count("\n") == 1
        with pytest.raises(ValueError, match=r"^widths: .* got widths \[4, 1?[26]\]$"):
            UNet(1, [int(w) for w in widths.split(",")], attention=True)
    UNet(1, [4, 16], attention=True)
    UNet(1, [4, 8], attention=True, heads=8)
