"""Figures (matplotlib), PNG pictures (Pillow) and progress bars (tqdm): formats, atomic writes, when a
bar shows, and that the hand-written encoder, font and bar are gone."""

import importlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm

import patchmosaic as pm
from patchmosaic.diffusion.kschedule import KSchedule, paper_schedule
from patchmosaic.io import images, plots, progress
from patchmosaic.io.images import write_png
from patchmosaic.io.plots import comparison_grid, kschedule_plot, save_figure, scatter

MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "svg": (b"<?xml", b"<svg"), "pdf": (b"%PDF",)}


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self):
        return True


def figures():
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((3, 1, 8, 8)) for _ in range(4)]
    ks = KSchedule((1.0, 0.5), (7, 3))
    return {"scatter": scatter(rng.random(5), rng.random(5), xlabel="r IS", ylabel="r ELS", title="t"),
            "grid": comparison_grid(rows, ["noise", "network", "ELS", "nearest"]),
            "ks": kschedule_plot({"ours": ks, "paper": paper_schedule("MNIST_ResNet_zeros")},
                                 rng.choice([3, 5, 7], (2, 4)), ks.times, title="t")}


def test_figures_are_written_as_png_svg_or_pdf_by_extension(tmp_path):
    for name, fig in figures().items():
        for fmt, magic in MAGIC.items():
            path = tmp_path / f"{name}.{fmt}"
            save_figure(fig, str(path))
            assert path.read_bytes().lstrip().startswith(magic), (name, fmt)
        with Image.open(tmp_path / f"{name}.png") as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    with pytest.raises(ValueError, match=r"\.png, \.svg, \.pdf"):
        save_figure(figures()["scatter"], str(tmp_path / "x.gif"))
    assert not (tmp_path / "x.gif").exists()


def test_figures_and_pictures_write_through_symlinks_atomically(tmp_path):
    for name, write in (("f.pdf", lambda p: save_figure(figures()["ks"], p)),
                        ("p.png", lambda p: write_png(p, np.zeros((4, 6, 3), np.uint8)))):
        target, link = tmp_path / ("real_" + name), tmp_path / name
        target.write_bytes(b"old")
        link.symlink_to(target)
        write(str(link))
        assert link.is_symlink() and target.read_bytes()[:4] in (b"%PDF", b"\x89PNG")
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_plots_have_axes_labels_and_legends():
    figs = figures()
    ax = figs["grid"].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["noise", "network", "ELS", "nearest"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"] and ax.get_xlabel() == "seed"
    pad = 1
    assert ax.get_images()[0].get_array().shape == (4 * (8 + pad) + pad, 3 * (8 + pad) + pad, 3)
    ax = figs["ks"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["per-seed choices", "ours", "paper"]
    assert ax.get_xlim()[0] > ax.get_xlim()[1]  # t = 1 on the left
    assert ax.get_ylabel() == "patch size k" and ax.get_title() == "t"
    ax = figs["scatter"].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("r IS", "r ELS")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["y = x", "seeds (5)"]
    ax = scatter([0.5, np.nan, -0.5], [0.2, 0.3, np.inf]).axes[0]
    assert ax.get_legend().get_texts()[1].get_text() == "seeds (1)"  # non-finite points left out


def test_plots_need_no_display_and_no_pyplot(tmp_path):
    code = ("import sys; from patchmosaic.io.plots import save_figure, scatter; "
            f"save_figure(scatter([0.1], [0.2]), {str(tmp_path / 's.svg')!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND", "WAYLAND_DISPLAY")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.svg").exists()


def gauss(x, t, labels):
    return x * 0.5


def test_progress_is_silent_when_stderr_is_not_a_terminal(capsys):
    pm.ddim(gauss, torch.zeros(1, 1, 2, 2), steps=5, progress=True)
    assert capsys.readouterr().err == ""


def test_progress_shows_on_a_terminal_unless_quiet_or_compiling(monkeypatch):
    tty = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", tty)
    pm.ddim(gauss, torch.zeros(1, 1, 2, 2), steps=5, progress=True)
    assert "ddim" in tty.getvalue() and "5/5" in tty.getvalue()
    tty.seek(0)
    tty.truncate()
    pm.ddim(gauss, torch.zeros(1, 1, 2, 2), steps=5, progress=False)  # --quiet
    assert tty.getvalue() == ""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    bar = progress.Progress(5, "traced")
    bar.update(postfix="k=3")
    bar.close()
    assert bar.bar is None and tty.getvalue() == ""


def test_progress_bar_is_tqdm_with_postfix_and_resumed_start():
    tty = FakeTerminal()
    bar = progress.Progress(10, "calibrate", initial=4, file=tty)
    assert isinstance(bar.bar, tqdm)
    bar.update(2, postfix="t=0.50 k=7")
    bar.close()
    assert "6/10" in tty.getvalue() and "t=0.50 k=7" in tty.getvalue()


def test_hand_written_encoder_font_and_bar_are_gone():
    folder = os.path.dirname(images.__file__)
    assert not os.path.exists(os.path.join(folder, "png.py"))
    with pytest.raises((ImportError, FileNotFoundError)):  # an editable install may still list the old file
        importlib.import_module("patchmosaic.io.png")
    assert not hasattr(plots, "draw_text") and not hasattr(plots, "_GLYPHS")
    for name in os.listdir(folder):
        if name.endswith(".py"):
            src = open(os.path.join(folder, name)).read()
            assert "import zlib" not in src and "import struct" not in src and "\\r" not in src, name
