"""Every Python code block of README.md runs as written: in order, in one namespace (as a reader pasting them
into one session would), in an empty working folder. The reference network comes from ../shared/models or
$PATCHMOSAIC_SHARED/models, which the README names; where neither exists the test is skipped and says why."""

import os
import re

import pytest

from conftest import SHARED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks():
    """``(first line number, code)`` of every fenced ``python`` block of README.md."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    pytest.importorskip("faiss", reason="the patch-index block needs FAISS (test extra)")
    models = os.path.join(SHARED, "models", "mnist_resnet_zeros", "model.pt")
    if not os.path.exists(models):
        pytest.skip(f"the README's reference-network block needs {models} (set PATCHMOSAIC_SHARED)")
    monkeypatch.setenv("PATCHMOSAIC_SHARED", os.path.abspath(SHARED))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for line, code in python_blocks():
        exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)
    # what the blocks promise, checked on what they made
    assert namespace["big"].shape == (1, 1, 48, 64)
    assert namespace["J"].shape == (2, 1, 1, 32, 32)
    assert (tmp_path / "ks.json").exists() and (tmp_path / "cmp" / "report.json").exists()
    assert namespace["res"].bound_conditional and namespace["res"].checked_pixels == 64
    assert len(namespace["policy"].record) == 10
