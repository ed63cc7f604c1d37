"""The wheel a user builds with the defaults: portable, complete, and runnable with every CPU variant here.

Builds the wheel from this checkout (CPU engine only, ``PATCHMOSAIC_CUDA=OFF``; about 90 s on 2 cores), checks
what it contains (the LICENSE, the CPU engine's instruction-set variants, no -march=native build), checks it
with ``auditwheel show`` (and ``auditwheel repair`` to a manylinux tag where patchelf is installed), then
unpacks it and runs tests/wheel_smoke.py from the unpacked copy (not from this checkout or an installed
copy) once for every variant this CPU executes, forced through ``PATCHMOSAIC_CPU_VARIANT``.
"""

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from patchmosaic import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86 = platform.machine() in ("x86_64", "AMD64")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "pyproject.toml")),
                                reason="needs the source checkout to build a wheel")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("scikit_build_core", reason="building the wheel needs scikit-build-core (test extra)")
    pytest.importorskip("pybind11", reason="building the wheel needs pybind11 (test extra)")
    work = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "PATCHMOSAIC_CUDA": "OFF"}
    env.pop("PATCHMOSAIC_NATIVE", None)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                        "-C", f"build-dir={work / 'build'}", "-w", str(work / "dist"), ROOT],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = (work / "dist").glob("patchmosaic-*.whl")
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"patchmosaic-[^/]+\.dist-info/licenses/LICENSE", n) for n in names), names
    license_text = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/LICENSE"))).decode()
    assert "MIT License" in license_text
    modules = {n.split("/")[-1].split(".")[0] for n in names if n.startswith("patchmosaic/_core") and ".so" in n}
    expected = {"_core", "_core_avx2", "_core_avx512"} if X86 else {"_core"}
    assert modules == expected, modules  # no _core_native unless PATCHMOSAIC_NATIVE=ON
    assert "patchmosaic/data/mnist_2k.npz" in names  # the built-in default data of the main job
    assert "patchmosaic/ops/triton_engine/auto_table.json" in names  # backend="auto"'s measured table


def test_each_variant_holds_its_instruction_set(wheel, tmp_path):
    """The baseline module has no AVX code at all (x86-64-v2: it runs on any x86-64 CPU of the last 15 years,
    so the default wheel is not tuned for the building machine), the AVX2 module uses 256-bit FMA and the
    AVX-512 module 512-bit registers."""
    objdump = shutil.which("objdump")
    if not objdump or not X86:
        pytest.skip("needs objdump on x86-64")
    asm = {}
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if n.startswith("patchmosaic/_core") and n.endswith(".so"):
                path = tmp_path / n.split("/")[-1]
                path.write_bytes(z.read(n))
                asm[n.split("/")[-1].split(".")[0]] = subprocess.run(
                    [objdump, "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True).stdout
    assert not re.search(r"%[yz]mm\d", asm["_core"]), "the baseline module contains AVX instructions"
    assert re.search(r"\tvfmadd\w+\s+%ymm", asm["_core_avx2"]) and not re.search(r"%zmm\d", asm["_core_avx2"])
    assert re.search(r"%zmm\d", asm["_core_avx512"])


def test_auditwheel(wheel, tmp_path):
    auditwheel = shutil.which("auditwheel")
    if auditwheel is None or sys.platform != "linux":
        pytest.skip("auditwheel is a Linux tool (test extra)")
    r = subprocess.run([auditwheel, "show", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    tag = re.search(r'constrains the platform tag to "(manylinux_\d+_\d+_\w+)"', text) or \
        re.search(r'consistent with the following platform tag: "(manylinux_\d+_\d+_\w+)"', text)
    assert tag, text
    if shutil.which("patchelf") is None:
        pytest.skip("auditwheel repair needs patchelf")
    r = subprocess.run([auditwheel, "repair", "--plat", tag.group(1), "-w", str(tmp_path), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (fixed,) = tmp_path.glob("*manylinux*.whl")
    assert tag.group(1) in fixed.name


def _unpack(wheel, tmp_path):
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    return target


def _run_smoke(site, variant):
    """tests/wheel_smoke.py from the unpacked wheel: ``python -S`` skips the site hooks (an editable install's
    import finder), PYTHONPATH puts the wheel first and this interpreter's packages (torch, numpy) after it."""
    paths = [str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    if variant:
        env["PATCHMOSAIC_CPU_VARIANT"] = variant
    return subprocess.run([sys.executable, "-S", os.path.join(ROOT, "tests", "wheel_smoke.py")],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("variant", [None] + list(ops.cpu_variants()))
def test_every_runnable_variant_of_the_wheel(wheel, tmp_path, variant):
    site = _unpack(wheel, tmp_path)
    r = _run_smoke(site, variant)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert f"from {site}" in r.stdout, r.stdout  # the unpacked wheel ran, not the checkout
    assert f"CPU engine {variant or ops.cpu_variant()}," in r.stdout, r.stdout


def test_the_wheel_refuses_a_variant_this_cpu_cannot_run(wheel, tmp_path):
    """AVX-512 on a CPU without it; on a CPU with it, 'native' (not in a default wheel) is refused the same way."""
    forced = "native" if "avx512" in ops.cpu_variants() else "avx512"
    r = _run_smoke(_unpack(wheel, tmp_path), forced)
    assert r.returncode != 0
    assert f"PATCHMOSAIC_CPU_VARIANT={forced!r}" in r.stderr and "runnable here" in r.stderr
