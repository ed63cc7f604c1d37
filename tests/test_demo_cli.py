"""The main job and the command line, end to end on reduced sizes."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import patchmosaic as pm
from patchmosaic.experiments.cli import main
from patchmosaic.diffusion.kschedule import KSchedule, paper_schedule, paper_schedule_names
from patchmosaic.io.images import write_png


def read_png(path):
    """Decode a PNG with Pillow (checking it is a complete 8-bit RGB PNG) to a uint8 ``(H, W, 3)`` array."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB", (im.format, im.mode)
        im.load()  # decodes every row: a truncated file fails here
        return np.asarray(im)


def test_png_round_trip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    write_png(str(tmp_path / "a.png"), img)
    assert np.array_equal(read_png(str(tmp_path / "a.png")), img)
    grey = img[:, :, 0]
    write_png(str(tmp_path / "g.png"), grey)
    assert np.array_equal(read_png(str(tmp_path / "g.png")), np.repeat(grey[:, :, None], 3, axis=2))
    with pytest.raises(TypeError, match="uint8"):
        write_png(str(tmp_path / "f.png"), img.astype(np.float32))


def test_default_data_is_packaged_and_preprocessed():
    x, y = pm.data.load_default()
    assert x.shape == (2000, 1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.bincount(y.numpy()).tolist() == [200] * 10


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.png"
    rc = main(["demo", "--out", str(out), "--n", "3", "--steps", "4", "--train-per-class", "15", "--quiet"])
    assert rc == 0
    img = read_png(str(out))
    # 4 rows x 3 seeds of 32x32 tiles scaled 3x with 2-pixel gutters
    assert img.shape == (4 * (96 + 2) + 2, 3 * (96 + 2) + 2, 3)
    text = capsys.readouterr().out
    assert "3 boundary-aware ELS samples" in text and "seed 2: label 2" in text


def test_demo_samples_are_a_deterministic_function_of_the_seed(tmp_path):
    from patchmosaic.experiments.demo import run_demo

    a = run_demo(str(tmp_path / "a.png"), n=2, steps=3, seed=5, train_per_class=10, progress=False)
    b = run_demo(str(tmp_path / "b.png"), n=2, steps=3, seed=5, train_per_class=10, progress=False)
    assert torch.equal(a["samples"], b["samples"])
    # the provenance of the last step names training images of the seed's own class
    _, labels = pm.data.load_default()
    keep = np.concatenate([np.nonzero(labels.numpy() == c)[0][:10] for c in range(10)])
    for s in range(2):
        assert set(labels.numpy()[keep][np.unique(a["provenance"].image[s].numpy())]) == {s}
    # the nearest training image and its Euclidean distance (once reported as that distance's square root)
    images = pm.data.load_default()[0][keep].double().reshape(len(keep), -1)
    dist = (a["samples"].double().reshape(2, 1, -1) - images[None]).pow(2).sum(-1).sqrt()
    assert torch.equal(a["nearest_index"], dist.argmin(1))
    assert torch.allclose(a["nearest_distance"], dist.min(1).values, rtol=1e-12, atol=1e-12)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "patchmosaic", "demo", "--n", "0", "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "argument --n/--samples: must be a positive integer" in r.stderr


def test_cli_help_documents_every_option():
    r = subprocess.run([sys.executable, "-m", "patchmosaic", "demo", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for opt in ["--out", "--n", "--steps", "--seed", "--train-per-class", "--backend", "--quiet"]:
        assert opt in r.stdout


def test_paper_k_schedules_translate_to_our_grid():
    names = paper_schedule_names()
    assert "MNIST_ResNet_zeros" in names
    s = paper_schedule("MNIST_ResNet_zeros")
    assert s.times[0] == 1.0 and s.times[-1] == pytest.approx(0.05)
    # paper entry i is used at t = i / 20; our t = 1 step takes entry 19 (t = 0.95)
    assert s.k_at(0.05) == 3 and s.k_at(0.5) == 11 and s.k_at(1.0) == 15 and s.k_at(0.95) == 15
    with pytest.raises(ValueError, match="unknown paper k-schedule"):
        paper_schedule("MNIST_Transformer")


def test_k_schedule_json_round_trip_and_checks(tmp_path):
    s = KSchedule((1.0, 0.5), (7, 3))
    s.to_json(str(tmp_path / "k.json"))
    assert KSchedule.from_json(str(tmp_path / "k.json")) == s
    with pytest.raises(ValueError, match="odd positive"):
        KSchedule((1.0,), (4,))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        KSchedule((0.0,), (3,))
