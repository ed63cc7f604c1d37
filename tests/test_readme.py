"""Every code block of README.md runs as written, for a user with nothing but the repository: in document order, in
an empty working folder, with no ../shared and $PATCHMOSAIC_SHARED pointing at an empty folder. Python blocks run
in one namespace (as a reader pasting them into one session would), shell blocks in bash in the same folder. The
few shell blocks that cannot run inside the test suite are listed in NOT_RUN_HERE with the place that runs them.
The quick start's two set-up commands: CI runs the test one (.ci/run), and setup.sh's choices are checked here."""

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

import patchmosaic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^( *)```(\w+)\n(.*?)^\1```", re.M | re.S)
SETUP_DEMO, SETUP_TEST = "bash setup.sh demo", "bash setup.sh test"

# shell blocks not run by this test: their first command's beginning -> who runs them
NOT_RUN_HERE = {
    SETUP_DEMO: "installs into the interpreter (pip); test_setup_script_chooses_the_torch_build checks its commands",
    SETUP_TEST: "CI: .ci/run runs it as written (test_ci_runs_the_readme_test_command)",
    "torchrun ": "tests/test_distributed.py::test_the_readme_torchrun_command_runs_as_written runs it as written",
    "pipx run cibuildwheel": "needs docker and the network; tests/test_wheel.py builds and checks this platform's wheel",
}


def readme():
    return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def blocks():
    """``(first line number, language, code)`` of every fenced block of README.md, its indentation removed."""
    text = readme()
    out = []
    for m in FENCE.finditer(text):
        indent = len(m.group(1))
        code = "\n".join(ln[indent:] for ln in m.group(3).split("\n"))
        out.append((text[: m.start()].count("\n") + 2, m.group(2), code))
    return out


def not_run_here(code):
    """The NOT_RUN_HERE reason of a shell block whose every command is listed there, else None."""
    reasons = []
    for ln in code.strip().splitlines():
        hit = [why for start, why in NOT_RUN_HERE.items() if ln.strip().startswith(start)]
        if not hit:
            return None
        reasons += hit
    return reasons


def test_readme_blocks_are_python_bash_or_text():
    langs = [lang for _, lang, _ in blocks()]
    assert langs.count("python") >= 6 and langs.count("bash") >= 4, langs
    assert set(langs) <= {"python", "bash", "text"}, langs
    for start in NOT_RUN_HERE:  # the list names commands the README has
        assert any(ln.strip().startswith(start) for _, lang, code in blocks() if lang == "bash"
                   for ln in code.splitlines()), start


def test_no_readme_block_needs_the_shared_folder():
    for line, lang, code in blocks():
        if lang != "text":
            assert "shared/" not in code and "PATCHMOSAIC_SHARED" not in code, f"README.md block at line {line}"


def _console_script(bin_dir):
    """A ``patchmosaic`` on the PATH that is the package this test imported, run by this interpreter (as the
    installed console script would run it)."""
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, "patchmosaic")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" -m patchmosaic "$@"\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    env = dict(os.environ)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(patchmosaic.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    return env


def test_every_readme_block_runs(tmp_path, monkeypatch):
    pytest.importorskip("faiss", reason="the patch-index block needs FAISS (test extra)")
    empty = tmp_path / "no_shared"
    empty.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("PATCHMOSAIC_SHARED", str(empty))
    monkeypatch.chdir(work)
    env = _console_script(str(tmp_path / "bin"))
    assert not (tmp_path / "shared").exists()  # ../shared of the working folder
    namespace = {"__name__": "__readme__"}
    ran = []
    for line, lang, code in blocks():
        where = f"README.md, block at line {line}"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)
        elif lang == "bash":
            if not_run_here(code):
                continue
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env, capture_output=True,
                                 text=True, timeout=600)
            assert res.returncode == 0, f"{where}:\n{code}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        ran.append((lang, line))
    assert sum(lang == "bash" for lang, _ in ran) >= 2
    # what the blocks promise, checked on what they made
    assert namespace["big"].shape == (1, 1, 48, 64)
    assert namespace["J"].shape == (2, 1, 1, 32, 32)
    assert (work / "ks.json").exists() and (work / "cmp" / "report.json").exists()
    assert namespace["res"].bound_conditional and namespace["res"].checked_pixels == 64
    assert len(namespace["policy"].record) == 10
    assert (work / "runs" / "tiny" / "model.safetensors").exists()
    assert (work / "runs" / "tiny" / "ddim20_samples.npz").exists()
    cfg = namespace["ref"].config  # the tiny preset's network, read back from its checkpoint
    assert (cfg["arch"], cfg["width"], cfg["depth"], cfg["num_classes"]) == ("resnet", 16, 2, 0)
    assert (work / "cmp_cli" / "report.json").exists() and (work / "cmp_cli" / "grid.png").exists()


def _command_lines(text):
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_ci_runs_the_readme_test_command():
    """The quick start's two set-up commands are one block; .ci/run runs the test one as written (after putting in
    the CI machine's own torch wheel, which setup.sh keeps)."""
    quick = [code for _, lang, code in blocks() if lang == "bash" and SETUP_TEST in code]
    assert len(quick) == 1 and _command_lines(quick[0]) == [SETUP_DEMO, SETUP_TEST]
    ci = _command_lines(open(os.path.join(ROOT, ".ci", "run")).read())
    assert ci[-1] == SETUP_TEST, ci
    assert ci.index("python3 -m pip install --quiet torch==2.13.0") < ci.index(SETUP_TEST)


def _stub(bin_dir, name, body):
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return path


def _setup(mode, env_extra, tmp_path):
    env = dict(os.environ)
    env.pop("PATCHMOSAIC_TORCH", None)
    env.update(env_extra)
    env["PATH"] = str(tmp_path) + os.pathsep + env.get("PATH", "")
    res = subprocess.run(["bash", os.path.join(ROOT, "setup.sh"), "--dry-run", mode], env=env, capture_output=True,
                         text=True, timeout=60)
    return res.returncode, res.stdout, res.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="setup.sh is a bash script")
def test_setup_script_chooses_the_torch_build(tmp_path):
    no_torch = _stub(str(tmp_path), "python-without-torch", "exit 1")  # `import torch` fails
    # no NVIDIA GPU (nvidia-smi absent or failing): the CPU build, from PyTorch's CPU index
    _stub(str(tmp_path), "nvidia-smi", "exit 9")
    code, out, _ = _setup("demo", {"PYTHON": no_torch}, tmp_path)
    assert code == 0 and f"+ {no_torch} -m pip install --quiet torch --index-url " \
                          "https://download.pytorch.org/whl/cpu" in out, out
    assert out.splitlines()[-2:] == [f"+ {no_torch} -m pip install --quiet .", f"+ {no_torch} -m patchmosaic demo"]
    # a GPU answers: pip's default (CUDA) build
    _stub(str(tmp_path), "nvidia-smi", 'echo "GPU 0: NVIDIA H100"')
    code, out, _ = _setup("test", {"PYTHON": no_torch}, tmp_path)
    assert code == 0 and f"+ {no_torch} -m pip install --quiet torch\n" in out and "whl/cpu" not in out, out
    assert out.splitlines()[-2:] == [f"+ {no_torch} -m pip install --quiet .[test]", f"+ {no_torch} -m pytest -q tests"]
    # a torch that imports is kept; PATCHMOSAIC_TORCH chooses the build itself
    code, out, _ = _setup("test", {"PYTHON": sys.executable}, tmp_path)
    assert code == 0 and "is installed; keeping it" in out and "install --quiet torch" not in out, out
    code, out, _ = _setup("demo", {"PYTHON": no_torch, "PATCHMOSAIC_TORCH": "torch==2.13.0"}, tmp_path)
    assert code == 0 and f"+ {no_torch} -m pip install --quiet torch==2.13.0\n" in out, out
    code, _, err = _setup("install", {}, tmp_path)
    assert code == 2 and "usage: bash setup.sh [--dry-run] demo|test" in err
