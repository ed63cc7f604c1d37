"""Hostile-input campaign (issue 28): hundreds of inputs a user outside the project might give, each with the class
of outcome it must have, run against the package as it is, and classified.

Every case is an input (an API call, a command line, a command line per rank of a torchrun-style job, or a
process sent Ctrl-C) and its expected class of outcome:

- ``error``: a clear error that names the problem (the case's pattern: the option, the file, the field), before
  any heavy work: a ValueError / TypeError / RuntimeError (``pm.ResourceError`` for memory) from the API, exit code
  2 and one line starting ``patchmosaic`` from the command (130 and "interrupted" for Ctrl-C);
- ``ok``: a correct result (the case's check, e.g. a 16-bit gradient spans [-1, 1], a dropped alpha channel gives
  the RGB pictures).

An outcome is **clean** when it is the expected class; otherwise it is a defect of one of these kinds:
``silent`` (no error where one was due, or a wrong result: the worst), ``unclear`` (an error that does not name
the problem, or is not one line), ``raw`` (an exception type outside the documented ones: a raw traceback at the
command line, ``internal error`` from the command), ``late`` (the error came only after the work it should have
prevented), ``crash`` (a process killed by a signal), ``hang`` (past the case's time limit), ``wrong-error``
(an error where a result was due).

    PYTHONPATH=python python bench/hostile_campaign.py [--only AREA,...] [--json bench/results/hostile_campaign.json]

Areas (newest features first): distributed, masks, datalocal, wiener, index, train, samplers, data, cli. Exit status 0 when
every case is clean. The run is limited to 12 GiB of address space (RLIMIT_AS), so that an unguarded allocation
fails instead of swapping the shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import SHARED, machine_line  # noqa: E402

# the documented kinds (ResourceError is a ValueError; OSError where a file system call names its file)
API_ERRORS = (ValueError, TypeError, RuntimeError, NotImplementedError, OSError)


@dataclass
class Case:
    area: str
    name: str
    kind: str  # "api" | "cli" | "proc" | "dist"
    expect: str  # "error" | "ok"
    run: Callable
    pattern: str = ""  # regex (case-insensitive) an error message must match: it names the problem
    check: Optional[Callable] = None  # ok cases: the result -> True when correct
    fast: float = 20.0  # an expected error must come within this many seconds (before the work)
    timeout: float = 120.0
    outcome: str = ""
    detail: str = ""
    seconds: float = 0.0


CASES: List[Case] = []


def case(area, name, kind, expect, run, pattern="", check=None, fast=20.0, timeout=120.0):
    CASES.append(Case(area, name, kind, expect, run, pattern, check, fast, timeout))


# ------------------------------------------------------------------------------------------------- fixtures
class Fix:
    """Files and objects the cases share (written once, in a temporary folder)."""

    def __init__(self, root: str):
        import torch

        import patchmosaic as pm
        from patchmosaic.networks import ResNet, save

        self.root = root
        rng = np.random.default_rng(28)
        self.rng = rng
        self.u8 = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
        self.y = np.arange(40) % 4
        self.tiny = self.npz("tiny.npz", x_train=self.u8, y_train=self.y)
        self.other = self.npz("other.npz", x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y_train=self.y)
        self.rgb8 = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
        self.rgb = self.npz("rgb.npz", x_train=self.rgb8, y_train=np.arange(12) % 3)
        self.imgs = rng.uniform(-1, 1, (24, 1, 8, 8)).astype(np.float32)
        self.labels = np.arange(24) % 3
        self.imgs3 = rng.uniform(-1, 1, (24, 3, 8, 8)).astype(np.float32)
        torch.manual_seed(0)
        self.net1 = os.path.join(root, "net1")
        save(self.net1, ResNet(1, 4, 1))
        self.net3 = os.path.join(root, "net3")
        save(self.net3, ResNet(3, 4, 1))
        self.net1b = os.path.join(root, "net1b")
        torch.manual_seed(1)
        save(self.net1b, ResNet(1, 4, 1))
        self.netc = os.path.join(root, "netc")
        save(self.netc, ResNet(1, 4, 1, num_classes=4))
        self.pm = pm
        self.torch = torch
        for name, ks in (("ks_a.json", [3, 3]), ("ks_b.json", [5, 3])):
            with open(self.path(name), "w") as fh:
                json.dump({"times": [1.0, 0.5], "ks": ks}, fh)
        for name, seed in (("seeds_a.npz", 1), ("seeds_b.npz", 2)):
            np.savez(self.path(name), seeds=np.random.default_rng(seed).standard_normal((2, 1, 32, 32))
                     .astype(np.float32))
        self.rgb333 = rng.integers(0, 256, (5, 3, 3, 3), dtype=np.uint8)
        self.p333 = self.npz("rgb333.npz", x_train=self.rgb333)
        self.u16 = self.npz("u16.npz", x_train=np.array([[[0, 65535]]], np.uint16))

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def npz(self, name, **arrays):
        p = self.path(name)
        np.savez(p, **arrays)
        return p

    def folder(self, name, pictures):
        """A folder of picture files: ``{file name: bytes or a PIL image}``."""
        d = self.path(name)
        os.makedirs(d, exist_ok=True)
        for fname, pic in pictures.items():
            if isinstance(pic, bytes):
                with open(os.path.join(d, fname), "wb") as f:
                    f.write(pic)
            else:
                pic.save(os.path.join(d, fname))
        return d


def png_bytes(w, h, rows, colour_type, bit_depth, declared=None):
    """A PNG written by hand (16-bit colour, bombs: what Pillow will not write)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    W, H = declared or (w, h)
    raw = b"".join(b"\x00" + r for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, bit_depth, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------------- runners
class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def run_api(c: Case):
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(c.timeout))
    t0 = time.perf_counter()
    try:
        res = c.run()
        c.seconds = time.perf_counter() - t0
        signal.alarm(0)
        if c.expect == "error":
            c.outcome, c.detail = "silent", f"no error; returned {type(res).__name__}"
            return
        ok = c.check(res) if c.check else True
        c.outcome, c.detail = ("clean", "") if ok is True else ("silent", f"wrong result: {ok}")
    except Timeout:
        c.seconds = time.perf_counter() - t0
        c.outcome, c.detail = "hang", f"no answer within {c.timeout:g} s"
    except BaseException as e:  # noqa: BLE001 -- classifying is the point
        signal.alarm(0)
        c.seconds = time.perf_counter() - t0
        msg = f"{type(e).__name__}: {e}"
        if isinstance(e, KeyboardInterrupt):
            raise
        if c.expect == "ok":
            c.outcome, c.detail = "wrong-error", msg[:300]
        elif not isinstance(e, API_ERRORS):
            c.outcome, c.detail = "raw", msg[:300] + " | " + traceback.format_exc().strip().splitlines()[-3][:200]
        elif c.pattern and not re.search(c.pattern, str(e), re.I | re.S):
            c.outcome, c.detail = "unclear", msg[:300]
        elif c.seconds > c.fast:
            c.outcome, c.detail = "late", f"after {c.seconds:.1f} s: {msg[:200]}"
        else:
            c.outcome, c.detail = "clean", msg[:200]


def _after(after):
    """The output a finished command left (its ``after``), or the error reading it (a missing file: a defect)."""
    try:
        return after()
    except Exception as e:  # noqa: BLE001
        return e


def _classify_command(c: Case, code, err: str, result=None):
    err = err.strip()
    if isinstance(result, Exception):
        c.outcome, c.detail = "silent", f"exit {code}, but its output is not there: {type(result).__name__}: {result}"
        return
    if c.expect == "ok":
        if code != 0:
            c.outcome, c.detail = "wrong-error", f"exit {code}: {err[-300:]}"
            return
        ok = c.check(result) if c.check else True
        c.outcome, c.detail = ("clean", "") if ok is True else ("silent", f"wrong result: {ok}")
        return
    if code == 0:
        c.outcome, c.detail = "silent", "exit 0"
    elif isinstance(code, int) and code < 0:
        c.outcome, c.detail = "crash", f"killed by signal {-code}: {err[-300:]}"
    elif "Traceback" in err or code == 1 or "internal error" in err:
        c.outcome, c.detail = "raw", f"exit {code}: {err[-400:]}"
    elif code not in (2, 130) or err.count("\n") or not err.startswith("patchmosaic"):
        c.outcome, c.detail = "unclear", f"exit {code}, {err.count(chr(10)) + 1} line(s): {err[-300:]}"
    elif c.pattern and not re.search(c.pattern, err, re.I | re.S):
        c.outcome, c.detail = "unclear", f"exit {code}: {err[-300:]}"
    elif c.seconds > c.fast:
        c.outcome, c.detail = "late", f"after {c.seconds:.1f} s: {err[-200:]}"
    else:
        c.outcome, c.detail = "clean", err[-200:]


def run_cli(c: Case):
    """``patchmosaic ARGS`` in this process (``main``), stderr captured."""
    from patchmosaic.experiments.cli import main

    argv, after = c.run()
    err, out = io.StringIO(), io.StringIO()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(c.timeout))
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse
                code = e.code
    except Timeout:
        c.seconds = time.perf_counter() - t0
        c.outcome, c.detail = "hang", f"no answer within {c.timeout:g} s"
        return
    except BaseException as e:  # noqa: BLE001 -- an exception out of main is a raw traceback at the command
        signal.alarm(0)
        c.seconds = time.perf_counter() - t0
        c.outcome, c.detail = "raw", f"{type(e).__name__}: {e}"[:300]
        return
    signal.alarm(0)
    c.seconds = time.perf_counter() - t0
    _classify_command(c, code, err.getvalue(), _after(after) if (after and code == 0) else None)


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **extra)
    env.pop("PYTHONSTARTUP", None)
    return env


def run_proc(c: Case):
    """A separate process: ``run()`` gives ``(argv, env, cwd, interrupt_after_s or None, after)``."""
    argv, env, cwd, interrupt, after = c.run()
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=_env(**env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if interrupt is not None:
        time.sleep(interrupt)
        p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=c.timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        c.seconds = time.perf_counter() - t0
        c.outcome, c.detail = "hang", f"no answer within {c.timeout:g} s"
        return
    c.seconds = time.perf_counter() - t0 - (interrupt or 0)
    _classify_command(c, p.returncode, err, _after(after) if (after and p.returncode == 0) else None)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dist(c: Case):
    """One ``python -m patchmosaic`` process per rank of a gloo job; ``run()`` gives ``(argv per rank, cwd,
    after)``. Every rank must have the expected outcome (an error: each rank's one line matches the pattern)."""
    argvs, cwd, after, *env = c.run()
    env = env[0] if env else {}
    port = _free_port()
    procs = []
    t0 = time.perf_counter()
    for r, argv in enumerate(argvs):
        e = _env(**dict(dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(len(argvs)), MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(port), PATCHMOSAIC_DIST_TIMEOUT="60"), **env))
        procs.append(subprocess.Popen([sys.executable, "-m", "patchmosaic"] + argv, env=e, cwd=cwd,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=c.timeout)
            outs.append((p.returncode, err))
    except subprocess.TimeoutExpired:
        c.seconds = time.perf_counter() - t0
        c.outcome, c.detail = "hang", f"no answer within {c.timeout:g} s"
        return
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    c.seconds = time.perf_counter() - t0
    worst = None
    for r, (code, err) in enumerate(outs):
        sub = Case(c.area, c.name, c.kind, c.expect, c.run, c.pattern, c.check if r == 0 else None, c.fast + 30,
                   c.timeout)  # rank 0 writes the output: its result is checked, the others' exit codes
        sub.seconds = c.seconds
        _classify_command(sub, code, err, _after(after) if (after and code == 0 and r == 0) else None)
        if sub.outcome != "clean" and worst is None:
            worst = (r, sub)
    if worst is None:
        c.outcome, c.detail = "clean", outs[0][1].strip()[-200:]
    else:
        c.outcome, c.detail = worst[1].outcome, f"rank {worst[0]}: {worst[1].detail}"


RUNNERS = {"api": run_api, "cli": run_cli, "proc": run_proc, "dist": run_dist}


# ============================================================================================ the cases
def finite(res):
    import torch

    a = res.numpy() if torch.is_tensor(res) else np.asarray(res)
    return True if np.all(np.isfinite(a)) else "non-finite values"


def npz_samples(path, shape):
    def after():
        with np.load(path) as z:
            s = z["samples"]
        return s
    def check(s):
        return True if s.shape == shape and np.isfinite(s).all() else f"samples of shape {s.shape}"
    return after, check


def distributed_cases(f: Fix):
    A = "distributed"
    base = ["sample", "--steps", "2", "--quiet", "--k", "3", "--data", f.tiny, "--samples", "2"]

    def job(a, b, out="d.png", env=None, cmd=base):
        out = f.path(out)
        return lambda: ([cmd + a + ["--out", out], cmd + b + ["--out", out]], f.root, None, env or {})

    differ = [
        ("a different --samples per rank", ["--samples", "2"], ["--samples", "3"], r"\bn \(2 on rank 0; 3 on rank 1\)"),
        ("a different --seed per rank", ["--seed", "0"], ["--seed", "1"], r"seed \(0 on rank 0; 1 on rank 1\)"),
        ("a different --k per rank", ["--k", "3"], ["--k", "5"], r"k_schedule \("),
        ("a k-schedule file with other contents per rank", ["--k", f.path("ks_a.json")], ["--k", f.path("ks_b.json")],
         r"k_schedule \("),
        ("different --labels per rank", ["--labels", "0,1"], ["--labels", "1,0"], r"labels \("),
        ("other data of the same shape per rank", ["--data", f.tiny], ["--data", f.other], r"\bdata \("),
        ("a different --canvas per rank", ["--canvas", "8x8"], ["--canvas", "10x10"], r"canvas \("),
        ("a different --machine per rank", ["--machine", "els"], ["--machine", "ls"], r"machine \("),
        ("a different --boundary per rank", ["--boundary", "zeros"], ["--boundary", "circular"], r"boundary \("),
        ("a different --steps per rank", ["--steps", "2"], ["--steps", "3"], r"steps \("),
        ("a different --sampler per rank", ["--sampler", "ddim"], ["--sampler", "ddpm"], r"sampler \("),
        ("a different --limit per rank", ["--limit", "20"], ["--limit", "30"], r"data \("),
        ("different --classes per rank", ["--classes", "0,1"], ["--classes", "1,2"], r"data \("),
        ("a different --key-shards per rank", ["--key-shards", "1"], ["--key-shards", "2"], r"key_shards \("),
    ]
    for name, a, b, pat in differ:
        case(A, name, "dist", "error", job(a, b), pat, fast=40)
    case(A, "--key-shards that does not divide the ranks", "dist", "error", job(["--key-shards", "3"],
         ["--key-shards", "3"]), r"key_shards must divide", fast=40)
    case(A, "rank 1's data file is missing", "dist", "error", job([], ["--data", f.path("none.npz")]),
         r"no data set at", fast=40)
    case(A, "rank 0 cannot write its --out (/dev/full)", "dist", "error",
         lambda: ([base + ["--out", "/dev/full"], base + ["--out", "/dev/full"]], f.root, None), r"/dev/full", fast=40)
    case(A, "$PATCHMOSAIC_KEY_SHARDS that is not a number", "dist", "error", job([], [], env={
        "PATCHMOSAIC_KEY_SHARDS": "two"}), r"PATCHMOSAIC_KEY_SHARDS", fast=40)
    case(A, "$PATCHMOSAIC_DIST_TIMEOUT that is not a number", "dist", "error", job([], [], env={
        "PATCHMOSAIC_DIST_TIMEOUT": "soon"}), r"PATCHMOSAIC_DIST_TIMEOUT", fast=40)
    after, check = npz_samples(f.path("same.npz"), (2, 1, 32, 32))
    case(A, "two ranks given the same command sample together", "dist", "ok",
         lambda after=after: ([base + ["--out", f.path("same.png")]] * 2, f.root, after), check=check)
    after, check = npz_samples(f.path("dl.npz"), (2, 1, 32, 32))
    case(A, "the data-driven machine over two key shards", "dist", "ok",
         lambda after=after: ([base + ["--machine", "datalocal", "--out", f.path("dl.png")]] * 2, f.root, after),
         check=check)
    cal = ["calibrate", "--network", f.net1, "--data", f.tiny, "--seeds", "2", "--steps", "2", "--quiet",
           "--candidates", "3,5"]
    case(A, "calibrate: a different --k-max per rank", "dist", "error",
         job(["--k-max", "3"], ["--k-max", "5"], "ks.json", cmd=[c for c in cal if c not in ("--candidates", "3,5")]),
         r"k_max \(", fast=40)
    case(A, "calibrate: a different network per rank", "dist", "error",
         job(["--network", f.net1], ["--network", f.net1b], "ks2.json", cmd=cal), r"network \(", fast=40)
    case(A, "calibrate: different --candidates per rank", "dist", "error",
         job(["--candidates", "3"], ["--candidates", "5"], "ks3.json", cmd=cal), r"candidates \(", fast=40)
    cmp = ["compare", "--network", f.net1, "--data", f.tiny, "--seeds", "2", "--steps", "2", "--quiet"]
    case(A, "compare: a different --machine k-schedule per rank", "dist", "error",
         job(["--machine", "els=3"], ["--machine", "els=5"], "cmp_d", cmd=cmp), r"machines \(", fast=40)
    case(A, "compare: a different number of --seeds per rank", "dist", "error",
         job(["--seeds", "2"], ["--seeds", "3"], "cmp_e", cmd=cmp), r"seeds \(", fast=40)
    case(A, "compare: a different --seeds-file per rank", "dist", "error",
         job(["--seeds-file", f.path("seeds_a.npz")], ["--seeds-file", f.path("seeds_b.npz")], "cmp_f", cmd=cmp),
         r"seeds \(", fast=40)
    case(A, "compare: two ranks given the same command", "dist", "ok",
         lambda: ([cmp + ["--machine", "ls=3", "--out", f.path("cmp_ok")]] * 2, f.root,
                  lambda: json.load(open(f.path("cmp_ok", "report.json")))),
         check=lambda rep: True if "LS=3" in str(rep["summary"]) or "ls=3" in rep["summary"] else "no ls=3 row")


def distributed_api_cases(f: Fix):
    A = "distributed"
    pm = f.pm
    from patchmosaic.distributed import ShardedMachine, launch
    from patchmosaic.distributed.queries import Layout

    case(A, "Layout(key_shards=0)", "api", "error", lambda: Layout(0), r"key_shards")
    case(A, "Layout(key_shards=2) in one process", "api", "error", lambda: Layout(2), r"key_shards must divide")
    case(A, "ShardedMachine('vit')", "api", "error", lambda: ShardedMachine("vit", f.imgs), r"machine must be one of")
    case(A, "ShardedMachine over 3-D images", "api", "error", lambda: ShardedMachine("els", f.imgs[0]), r"shape")
    case(A, "ShardedMachine index option m=0", "api", "error",
         lambda: ShardedMachine("els", f.imgs, backend="index", index_options={"m": 0}), r"\bm must be")
    case(A, "ShardedMachine index option tol=nan", "api", "error",
         lambda: ShardedMachine("els", f.imgs, backend="index", index_options={"tol": float("nan")}), r"tol")
    case(A, "ShardedMachine index options as a list", "api", "error",
         lambda: ShardedMachine("els", f.imgs, backend="index", index_options=[("m", 4)]), r"index_options")
    case(A, "ShardedMachine sensitivity", "api", "error",
         lambda: ShardedMachine("els", f.imgs).sensitivity(f.imgs[:1], 0.5, 3), r"not differentiable")
    case(A, "launch.timeout_seconds(-1)", "api", "error", lambda: launch.timeout_seconds(-1), r"positive")
    case(A, "ShardedMachine in one process equals ELS", "api", "ok",
         lambda: (ShardedMachine("els", f.imgs).denoise(f.imgs[:2], 0.5, 3), pm.ELS(f.imgs).denoise(f.imgs[:2], 0.5, 3)),
         check=lambda r: True if np.allclose(r[0], r[1], atol=1e-5) else "differs from ELS")
    case(A, "agree() in one process does nothing", "api", "ok", lambda: launch.agree({"n": 1}), check=lambda r: True)


def mask_cases(f: Fix):
    A = "masks"
    pm, torch = f.pm, f.torch
    m, ls = pm.ELS(f.imgs), pm.LS(f.imgs)
    x = f.rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    sq = m.denoise(x, 0.5, 3)
    ones = np.ones((3, 3))

    def with_centre(v, c=1.0):
        a = np.full((3, 3), v, dtype=np.float64)
        a[1, 1] = c
        return a

    bad = [
        ("a NaN weight", with_centre(np.nan), r"NaN"), ("an infinite weight", with_centre(np.inf), r"infinite"),
        ("a negative weight", with_centre(-1.0), r"negative"), ("a zero centre", with_centre(1.0, 0.0), r"centre"),
        ("an even 4x4 mask", np.ones((4, 4)), r"odd"), ("a 1-D mask", np.ones(3), r"square|shape"),
        ("a 3-D mask", np.ones((2, 3, 3)), r"shape"), ("a 3x5 mask", np.ones((3, 5)), r"square"),
        ("an all-zero mask", np.zeros((3, 3)), r"centre"), ("a complex mask", np.ones((3, 3), complex), r"dtype"),
        ("an object array", np.array([[1, "a", 1]] * 3, dtype=object), r"dtype"), ("a string", "abc", r"dtype|shape"),
        ("an empty (0, 0) mask", np.ones((0, 0)), r"shape"),
        ("a per-pixel mask of another canvas", np.ones((9, 8, 3, 3)), r"patch_mask|pixel|canvas|9"),
        ("a per-pixel mask with one zero centre", np.where(np.arange(9).reshape(3, 3) == 4, 0, 1)[None, None]
         .repeat(8, 0).repeat(8, 1).astype(float), r"centre"),
    ]
    for name, mask, pat in bad:
        case(A, f"ELS.denoise with {name}", "api", "error", lambda mask=mask: m.denoise(x, 0.5, None, patch_mask=mask),
             pat)
    case(A, "a 3x3 mask with k=5", "api", "error", lambda: m.denoise(x, 0.5, 5, patch_mask=ones), r"k=5")
    case(A, "IS with a mask", "api", "error", lambda: pm.IS(f.imgs).denoise(x, 0.5, patch_mask=ones), r"IS")
    case(A, "a mask of ones is the square patch", "api", "ok", lambda: m.denoise(x, 0.5, None, patch_mask=ones),
         check=lambda r: True if np.allclose(r, sq, atol=1e-5) else "differs from the square machine")
    for name, mask in (("an int mask", np.ones((3, 3), np.int64)), ("a bool mask", np.ones((3, 3), bool)),
                       ("nested lists", [[1, 1, 1]] * 3), ("a float16 tensor", torch.ones(3, 3, dtype=torch.float16)),
                       ("a mask needing grad", torch.ones(3, 3, dtype=torch.float64, requires_grad=True)),
                       ("a per-pixel mask of ones", np.ones((8, 8, 3, 3)))):
        case(A, f"ELS.denoise with {name}", "api", "ok", lambda mask=mask: m.denoise(x, 0.5, None, patch_mask=mask),
             check=lambda r: True if np.allclose(r, sq, atol=1e-5) else "differs from the square machine")
    for big in (1e30, 1e38, 1e300):
        case(A, f"weights of {big:g}", "api", "error",
             lambda big=big: m.denoise(x, 0.5, None, patch_mask=with_centre(big)), r"too large.*patch_mask weights")
    case(A, "a per-pixel mask with one pixel's weights of 1e38", "api", "error",
         lambda: m.denoise(x, 0.5, None, patch_mask=np.concatenate([with_centre(1e38)[None, None].repeat(1, 1),
                                                                    np.ones((1, 7, 3, 3))], 1).repeat(8, 0)),
         r"too large")
    case(A, "weights of 1e30 in float64", "api", "ok",
         lambda: pm.ELS(f.imgs.astype(np.float64)).denoise(x.astype(np.float64), 0.5, None,
                                                          patch_mask=with_centre(1e30)), check=finite)
    case(A, "weights of 1e-300 off the centre", "api", "ok",
         lambda: m.denoise(x, 0.5, None, patch_mask=with_centre(1e-300)), check=finite)
    case(A, "LS with a per-pixel mask", "api", "ok", lambda: ls.denoise(x, 0.5, None, patch_mask=np.ones((8, 8, 3, 3))),
         check=lambda r: True if np.allclose(r, ls.denoise(x, 0.5, 3), atol=1e-5) else "differs from LS")
    case(A, "a k-schedule larger than the mask", "api", "error",
         lambda: pm.MachineDenoiser(m, pm.KSchedule((1.0, 0.5), (5, 3)), patch_mask=ones), r"larger than")
    case(A, "a per-pixel mask cropped by a k-schedule", "api", "ok",
         lambda: pm.MachineDenoiser(m, pm.KSchedule((1.0, 0.5), (5, 3)), patch_mask=np.ones((8, 8, 5, 5)))(x, 0.5),
         check=lambda r: True if np.allclose(r, sq, atol=1e-5) else "differs from the square machine")
    case(A, "a MachineDenoiser mask on IS", "api", "error", lambda: pm.MachineDenoiser(pm.IS(f.imgs), None,
                                                                                      patch_mask=ones), r"IS")
    case(A, "eps with a mask", "api", "ok", lambda: m.eps(x, 0.5, None, patch_mask=with_centre(0.5)), check=finite)
    case(A, "sensitivity with a mask", "api", "ok",
         lambda: pm.ELS(f.imgs.astype(np.float64)).sensitivity(x.astype(np.float64), 0.5, None, (4, 4),
                                                               patch_mask=with_centre(0.5)), check=finite)
    try:
        import faiss  # noqa: F401
        case(A, "a patch index with a per-pixel mask", "api", "error",
             lambda: pm.PatchIndex(m, 3, patch_mask=np.ones((8, 8, 3, 3)), progress=False), r"per pixel")
        case(A, "a patch index whose mask is 5x5 at k=3", "api", "error",
             lambda: pm.PatchIndex(m, 3, patch_mask=np.ones((5, 5)), progress=False), r"patch_mask is 5x5")
        case(A, "a sharded index machine with a mask", "api", "error",
             lambda: pm.distributed.ShardedMachine("els", f.imgs, backend="index").denoise(x, 0.5, 3, patch_mask=ones),
             r"mask")
    except ImportError:
        pass


def datalocal_cases(f: Fix):
    A = "datalocal"
    pm = f.pm
    dl = pm.DataLocal(f.imgs, f.labels)
    x = f.rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    for w in (4, 0, -1, True, 3.0, 99):
        case(A, f"window={w!r}", "api", "error", lambda w=w: pm.DataLocal(f.imgs, window=w), r"window")
    case(A, "weighting='soft'", "api", "error", lambda: pm.DataLocal(f.imgs, weighting="soft"), r"weighting")
    case(A, "boundary='reflect'", "api", "error", lambda: pm.DataLocal(f.imgs, boundary="reflect"), r"boundary")
    case(A, "a boundary given where the labels go", "api", "error", lambda: pm.DataLocal(f.imgs, "reflect"),
         r"labels")
    for name, st, pat in (("of another shape", f.rng.uniform(-1, 1, (5, 1, 6, 6)).astype(np.float32), r"statistics"),
                          ("with NaN", np.full((5, 1, 8, 8), np.nan, np.float32), r"NaN"),
                          ("of 3 dimensions", f.imgs[:, 0], r"dimensions"),
                          ("of integers", np.zeros((5, 1, 8, 8), np.int32), r"float32 or float64"),
                          ("that is empty", np.zeros((0, 1, 8, 8), np.float32), r"empty")):
        case(A, f"statistics {name}", "api", "error", lambda st=st: pm.DataLocal(f.imgs, statistics=st), pat)
    for k, pat in ((4, r"odd"), (0, r"odd"), (None, r"neighbourhood size"), (1.5, r"patch size k"), ("3", r"k")):
        case(A, f"denoise with k={k!r}", "api", "error", lambda k=k: dl.denoise(x, 0.5, k), pat)
    case(A, "denoise with k=999 (larger than the image)", "api", "ok", lambda: dl.denoise(x, 0.5, 999), check=finite)
    for t, pat in ((0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), (float("nan"), r"\(0, 1\]"), (np.array([]), r"empty|shape"),
                   ("0.5", r"\bt\b")):
        case(A, f"denoise with t={t!r}", "api", "error", lambda t=t: dl.denoise(x, t, 3), pat)
    case(A, "one time per image", "api", "ok", lambda: dl.denoise(x, np.array([0.3, 0.6]), 3), check=finite)
    case(A, "provenance with two times", "api", "error",
         lambda: dl.denoise(x, np.array([0.3, 0.6]), 3, return_provenance=True), r"one time")
    case(A, "per_pixel on another canvas", "api", "error",
         lambda: pm.DataLocal(f.imgs, per_pixel=True).denoise(np.zeros((1, 1, 9, 9), np.float32), 0.5, 3),
         r"training size")
    case(A, "an unknown label", "api", "error", lambda: dl.denoise(x, 0.5, 3, labels=[7, 7]), r"label")
    case(A, "a patch_mask of its own", "api", "error", lambda: dl.denoise(x, 0.5, 3, patch_mask=np.ones((3, 3))),
         r"chooses its own")
    case(A, "512x512 images (fields of 512 GiB)", "api", "error",
         lambda: pm.DataLocal(np.zeros((2, 1, 512, 512), np.float32)), r"GiB", fast=5)
    case(A, "check_request of a huge batch", "api", "error",
         lambda: dl.check_request((1 << 24, 1, 8, 8), k=3), r"GiB", fast=5)
    case(A, "denoise_ks in the wrong order", "api", "error", lambda: dl.denoise_ks(x, 0.5, [5, 3]), r"increasing")
    case(A, "the mask has k^2 pixels", "api", "ok", lambda: dl.mask(0.5, 3),
         check=lambda r: True if int(r.sum()) == 9 and r.dtype == f.torch.bool else f"{int(r.sum())} pixels")
    case(A, "float64 images", "api", "ok", lambda: pm.DataLocal(f.imgs.astype(np.float64)).denoise(
        x.astype(np.float64), 0.5, 3), check=finite)
    case(A, "ShardedDataLocal in one process equals DataLocal", "api", "ok",
         lambda: (pm.distributed.ShardedDataLocal(f.imgs, f.labels, statistics=f.imgs).denoise(x, 0.5, 3,
                                                                                               labels=[0, 1]),
                  dl.denoise(x, 0.5, 3, labels=[0, 1])),
         check=lambda r: True if np.allclose(r[0], r[1], atol=1e-5) else "differs")


def wiener_cases(f: Fix):
    A = "wiener"
    pm = f.pm
    w, wu = pm.Wiener(f.imgs, f.labels), pm.Wiener(f.imgs)
    x = f.rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    calls = [
        ("3-channel queries", lambda: w.denoise(np.zeros((2, 3, 8, 8), np.float32), 0.5), r"channel|shape"),
        ("queries of another canvas", lambda: w.denoise(np.zeros((2, 1, 9, 9), np.float32), 0.5), r"8x8|size"),
        ("t = 0", lambda: w.denoise(x, 0.0), r"\(0, 1\]"), ("t = NaN", lambda: w.denoise(x, float("nan")), r"\(0, 1\]"),
        ("float16 queries", lambda: w.denoise(x.astype(np.float16), 0.5), r"float32 or float64"),
        ("integer queries", lambda: w.denoise(np.zeros((2, 1, 8, 8), np.int64), 0.5), r"float32 or float64"),
        ("an unknown label", lambda: w.denoise(x, 0.5, labels=[7, 7]), r"label"),
        ("labels on an unlabelled filter", lambda: wu.denoise(x, 0.5, labels=[0, 1]), r"without training labels"),
        ("statistics of an unknown label", lambda: w.statistics(9), r"label"),
        ("NaN training images", lambda: pm.Wiener(np.full((3, 1, 8, 8), np.nan, np.float32)), r"NaN"),
        ("integer training images", lambda: pm.Wiener(np.zeros((3, 1, 8, 8), np.int16)), r"float32 or float64"),
        ("max_memory=1", lambda: pm.Wiener(f.imgs, max_memory=1), r"GiB"),
        ("the Jacobian of 256x256 images", lambda: pm.Wiener(np.zeros((2, 1, 256, 256), np.float32)).jacobian(0.5),
         r"GiB"),
        ("labels of the wrong length", lambda: pm.Wiener(f.imgs, f.labels[:5]), r"shape|labels"),
        ("float labels", lambda: pm.Wiener(f.imgs, f.labels.astype(float)), r"integers"),
    ]
    for name, fn, pat in calls:
        case(A, name, "api", "error", fn, pat, fast=10)
    case(A, "one training image", "api", "ok", lambda: pm.Wiener(f.imgs[:1]).denoise(x, 0.5), check=finite)
    case(A, "k is ignored", "api", "ok", lambda: (wu.denoise(x, 0.5, 7), wu.denoise(x, 0.5)),
         check=lambda r: True if np.array_equal(r[0], r[1]) else "k changed the result")
    case(A, "float64 numpy queries answer in float64", "api", "ok", lambda: wu.denoise(x.astype(np.float64), 0.5),
         check=lambda r: True if isinstance(r, np.ndarray) and r.dtype == np.float64 else f"{type(r)} {r.dtype}")


def index_cases(f: Fix):
    A = "index"
    try:
        import faiss  # noqa: F401
    except ImportError:
        return
    pm, torch = f.pm, f.torch
    m = pm.ELS(f.imgs, f.labels)
    x = f.rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    idx = pm.PatchIndex(m, 3, kind="flat", progress=False)
    folder = f.path("index_k3")
    idx.save(folder)
    build = [("kind='hnsw'", dict(kind="hnsw"), r"kind"), ("nprobe=0", dict(nprobe=0), r"nprobe"),
             ("pq_m=0", dict(pq_m=0, kind="ivfpq"), r"pq_m"), ("nlist=0", dict(nlist=0, kind="ivf"), r"nlist"),
             ("nprobe=-3", dict(nprobe=-3), r"nprobe"), ("min_index_keys=-1", dict(min_index_keys=-1), r"min_index_keys")]
    for name, kw, pat in build:
        case(A, f"PatchIndex({name})", "api", "error", lambda kw=kw: pm.PatchIndex(m, 3, progress=False, **kw), pat)
    case(A, "PatchIndex at an even k", "api", "error", lambda: pm.PatchIndex(m, 4, progress=False), r"odd")
    case(A, "PatchIndex at k = 99", "api", "error", lambda: pm.PatchIndex(m, 99, progress=False), r"larger than")
    case(A, "PatchIndex of IS", "api", "error", lambda: pm.PatchIndex(pm.IS(f.imgs), 3, progress=False), r"IS")
    for mm, pat in ((0, r"\bm\b"), (-1, r"\bm\b"), (2.5, r"\bm\b")):
        case(A, f"denoise with m={mm}", "api", "error", lambda mm=mm: idx.denoise(x, 0.5, [0, 1], mm), pat)
    case(A, "denoise with m larger than the keys", "api", "ok", lambda: idx.denoise(x, 0.5, [0, 1], 10**6).x0,
         check=lambda r: True if np.allclose(r, m.denoise(x, 0.5, 3, [0, 1]), atol=1e-4) else "differs from exact")
    case(A, "queries of another canvas", "api", "error", lambda: idx.denoise(np.zeros((1, 1, 9, 9), np.float32), 0.5,
                                                                            [0]), r"canvas|9x9|size|shape")
    case(A, "an unknown query label", "api", "error", lambda: idx.denoise(x, 0.5, [7, 7]), r"label")
    case(A, "t = 0", "api", "error", lambda: idx.denoise(x, 0.0, [0, 1]), r"\(0, 1\]")
    case(A, "NaN queries", "api", "error", lambda: idx.denoise(np.full_like(x, np.nan), 0.5, [0, 1]), r"NaN")
    case(A, "check_pixels=-1", "api", "error", lambda: idx.denoise(x, 0.5, [0, 1], check_pixels=-1), r"check_pixels")
    case(A, "float64 queries", "api", "error", lambda: idx.denoise(x.astype(np.float64), 0.5, [0, 1]), r"float32")
    case(A, "load from a missing folder", "api", "error", lambda: pm.PatchIndex.load(f.path("nowhere"), m, 3),
         r"no patch index")

    def broken(name, edit):
        d = f.path("index_" + name)
        shutil.copytree(folder, d)
        edit(d)
        return lambda: pm.PatchIndex.load(d, m, 3)

    def manifest_as(value):
        return lambda d: json.dump(value, open(os.path.join(d, "manifest.json"), "w"))

    def manifest_edit(fn):
        def edit(d):
            man = json.load(open(os.path.join(d, "manifest.json")))
            fn(man)
            json.dump(man, open(os.path.join(d, "manifest.json"), "w"))
        return edit

    def set_(key, value):
        return lambda man: man.__setitem__(key, value)

    variants = [
        ("a JSON list", manifest_as([1, 2]), r"manifest"), ("a JSON string", manifest_as("index"), r"manifest"),
        ("JSON null", manifest_as(None), r"manifest"), ("a number", manifest_as(3), r"manifest"),
        ("truncated JSON", lambda d: open(os.path.join(d, "manifest.json"), "w").write('{"format": '), r"manifest"),
        ("parts that are not a list", manifest_edit(set_("parts", {"a": 1})), r"manifest"),
        ("a part that is a number", manifest_edit(lambda man: man["parts"].__setitem__(0, 5)), r"manifest"),
        ("a part file outside the folder", manifest_edit(lambda man: man["parts"][0].__setitem__("file", "../x")),
         r"manifest"),
        ("k of another index", manifest_edit(set_("k", 5)), r"does not match"),
        ("k as a string", manifest_edit(set_("k", "3")), r"manifest"),
        ("another fingerprint", manifest_edit(set_("fingerprint", "0" * 20)), r"does not match"),
        ("a corrupt key file", lambda d: open(os.path.join(d, "part_0.keys.npz"), "wb").write(b"PK junk"),
         r"part_0\.keys\.npz"),
        ("a truncated FAISS file", lambda d: open(os.path.join(d, "part_0.faiss"), "r+b").truncate(10), r"part_0\.faiss"),
        ("a missing FAISS file", lambda d: os.remove(os.path.join(d, "part_1.faiss")), r"part_1\.faiss"),
    ]
    for name, edit, pat in variants:
        case(A, f"an index manifest/file: {name}", "api", "error", broken(name.replace(" ", "_")[:20], edit), pat)
    case(A, "load an index for other data", "api", "error",
         lambda: pm.PatchIndex.load(folder, pm.ELS(f.imgs[::-1].copy(), f.labels[::-1].copy()), 3), r"does not match")
    case(A, "a flat index of 60,000 32x32 images at k = 31", "api", "error",
         lambda: pm.PatchIndex(pm.ELS(np.random.default_rng(0).uniform(-1, 1, (60000, 1, 32, 32)).astype(np.float32)),
                               31, kind="flat", progress=False), r"GiB", fast=30)
    for kind in ("ivf", "ivfpq"):
        case(A, f"an {kind} index whose parts have fewer keys than lists", "api", "ok",
             lambda kind=kind: pm.PatchIndex(pm.ELS(f.imgs[:6]), 3, kind=kind, min_index_keys=0, progress=False)
             .denoise(x, 0.5).x0, check=finite)
    case(A, "open() an index saved for another k", "api", "error",
         lambda: pm.PatchIndex.open(folder, m, 5, progress=False), r"does not match")
    case(A, "IndexedDenoiser(tol=-1)", "api", "error", lambda: pm.IndexedDenoiser(m, 3, tol=-1), r"tol")
    case(A, "IndexedDenoiser(mode='fast')", "api", "error", lambda: pm.IndexedDenoiser(m, 3, mode="fast"), r"mode")
    case(A, "IndexedDenoiser(max_exact_fraction=2)", "api", "error",
         lambda: pm.IndexedDenoiser(m, 3, max_exact_fraction=2), r"max_exact_fraction")
    case(A, "a flat index is exact within its bound", "api", "ok", lambda: idx.denoise(x, 0.5, [0, 1], 64),
         check=lambda r: True if bool((np.abs(r.x0.numpy() - m.denoise(x, 0.5, 3, [0, 1])) <=
                                       r.bound.numpy()[:, None] + 1e-4).all()) else "outside its bound")
    case(A, "save into a path that is a file", "api", "error", lambda: idx.save(f.tiny), r"tiny\.npz")


def train_cases(f: Fix):
    A = "train"
    pm, torch = f.pm, f.torch
    from patchmosaic.networks import ResNet, TrainConfig, train

    cfg = {"arch": "resnet", "channels": 1, "width": 4, "depth": 1, "padding": "zeros", "num_classes": 0}
    x = f.imgs[:16]
    n = [0]

    def out():
        n[0] += 1
        return f.path(f"train_{n[0]}")

    def run(config=None, images=x, labels=None, net=None, **kw):
        return lambda: train(dict(net or cfg), images, labels, out=out(), config=config, progress=False, **kw)

    bad = [("lr=0", dict(lr=0.0), r"lr"), ("lr=-1", dict(lr=-1.0), r"lr"), ("lr=NaN", dict(lr=float("nan")), r"lr"),
           ("lr=inf", dict(lr=float("inf")), r"lr"), ("lr=1e30", dict(lr=1e30), r"diverged.*lr"),
           ("weight_decay=-1", dict(weight_decay=-1.0), r"weight_decay"),
           ("weight_decay=inf", dict(weight_decay=float("inf")), r"weight_decay"),
           ("weight_decay=NaN", dict(weight_decay=float("nan")), r"weight_decay"),
           ("weight_decay=1e30", dict(weight_decay=1e30), r"diverged|weight_decay"),
           ("ema_decay=1", dict(ema_decay=1.0), r"ema"), ("ema_decay=-0.1", dict(ema_decay=-0.1), r"ema"),
           ("ema_decay=NaN", dict(ema_decay=float("nan")), r"ema"), ("steps=0", dict(steps=0), r"steps"),
           ("steps=1.5", dict(steps=1.5), r"steps"), ("batch_size=0", dict(batch_size=0), r"batch_size"),
           ("checkpoint_every=0", dict(checkpoint_every=0), r"checkpoint_every"), ("seed=-1", dict(seed=-1), r"seed"),
           ("seed=2**64", dict(seed=2**64), r"seed"), ("t_min=0", dict(t_min=0.0), r"t_min"),
           ("schedule='quadratic'", dict(schedule="quadratic"), r"schedule"),
           ("device='gpu'", dict(device="gpu"), r"device \(--device\) 'gpu'"),
           ("device='meta'", dict(device="meta"), r"device \(--device\) 'meta'"),
           ("device='cuda' (no CUDA here)", dict(device="cuda"), r"device='cuda'|CUDA"),
           ("log_every=0", dict(log_every=0), r"log_every")]
    for name, kw, pat in bad:
        kw = dict(dict(steps=3, batch_size=4), **kw)
        case(A, f"TrainConfig({name})", "api", "error", lambda kw=kw: run(TrainConfig(**kw))(), pat, fast=30)
    small = TrainConfig(steps=2, batch_size=4)
    case(A, "NaN images", "api", "error", run(small, np.full_like(x, np.nan)), r"NaN")
    case(A, "3-channel images for a 1-channel network", "api", "error", run(small, f.imgs3[:16]), r"channels")
    case(A, "integer images", "api", "error", run(small, np.zeros((4, 1, 8, 8), np.int16)), r"float32 or float64")
    case(A, "no images", "api", "error", run(small, np.zeros((0, 1, 8, 8), np.float32)), r"empty")
    cond = dict(cfg, num_classes=4)
    case(A, "a conditional network without labels", "api", "error", run(small, net=cond), r"needs labels")
    case(A, "labels outside the classes", "api", "error", run(small, labels=np.full(16, 9), net=cond),
         r"labels must lie")
    case(A, "labels of the wrong length", "api", "error", run(small, labels=np.zeros(3, int), net=cond), r"shape")
    case(A, "an unknown architecture", "api", "error", run(small, net=dict(cfg, arch="vit")), r"architecture")
    case(A, "a width of 0", "api", "error", run(small, net=dict(cfg, width=0)), r"width|config")
    case(A, "an odd width", "api", "error", run(small, net=dict(cfg, width=3)), r"width|even|config")
    case(A, "the output is a regular file", "api", "error",
         lambda: train(dict(cfg), x, out=f.tiny, config=small, progress=False), r"tiny\.npz")
    case(A, "the output is /dev/null", "api", "error",
         lambda: train(dict(cfg), x, out="/dev/null", config=small, progress=False), r"/dev/null")
    resume = f.path("train_resume")
    train(dict(cfg), x, out=resume, config=TrainConfig(steps=2, batch_size=4), progress=False)
    case(A, "resume on other data of the same shape", "api", "error",
         lambda: train(dict(cfg), x[::-1].copy(), out=resume, config=TrainConfig(steps=3, batch_size=4),
                       progress=False), r"other training data")
    case(A, "resume on other labels", "api", "error",
         lambda: train(dict(cond), x, np.arange(16) % 4, out=f.path("train_resume_c"), config=TrainConfig(
             steps=2, batch_size=4), progress=False) and train(dict(cond), x, (np.arange(16) + 1) % 4,
                                                               out=f.path("train_resume_c"), config=TrainConfig(
             steps=3, batch_size=4), progress=False), r"other training data")
    case(A, "resume with another lr", "api", "error",
         lambda: train(dict(cfg), x, out=resume, config=TrainConfig(steps=3, batch_size=4, lr=1e-3), progress=False),
         r"lr=")
    case(A, "resume a different network", "api", "error",
         lambda: train(dict(cfg, width=8), x, out=resume, config=TrainConfig(steps=3, batch_size=4), progress=False),
         r"different network")
    case(A, "resume with override continues", "api", "ok",
         lambda: train(dict(cfg), x[::-1].copy(), out=resume, config=TrainConfig(steps=3, batch_size=4),
                       progress=False, override=True),
         check=lambda net: True if all(bool(torch.isfinite(p).all()) for p in net.parameters()) else "NaN weights")
    case(A, "a short run trains finite weights", "api", "ok", run(TrainConfig(steps=3, batch_size=4)),
         check=lambda net: True if all(bool(torch.isfinite(p).all()) for p in net.parameters()) else "NaN weights")
    case(A, "a module, not a config", "api", "ok",
         lambda: train(ResNet(1, 4, 1), x, out=out(), config=small, progress=False),
         check=lambda net: True if all(bool(torch.isfinite(p).all()) for p in net.parameters()) else "NaN weights")


def sampler_cases(f: Fix):
    A = "samplers"
    pm = f.pm
    den = pm.MachineDenoiser(pm.ELS(f.imgs, f.labels), 3)
    x = f.rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    for steps, pat in ((0, r"steps"), (-1, r"steps"), (2.5, r"steps"), (True, r"steps"), ("20", r"steps"),
                       (10**10, r"GiB")):
        case(A, f"ddim(steps={steps!r})", "api", "error", lambda steps=steps: pm.ddim(den, x, steps=steps,
                                                                                      progress=False), pat, fast=5)
    for grid in ([1.0, 0.5, 0.5, 0.0], [0.5, 1.0], [1.0, float("nan")], [2.0, 0.0], [1.0], [[1.0, 0.0]]):
        case(A, f"ddim(grid={grid})", "api", "error", lambda grid=grid: pm.ddim(den, x, grid=grid, progress=False),
             r"grid")
    case(A, "ddpm with a generator that is not one", "api", "error",
         lambda: pm.ddpm(den, x, generator=5, steps=2, progress=False), r"generator")
    case(A, "labels of a class the machine lacks", "api", "error",
         lambda: pm.ddim(den, x, [0, 7], steps=2, progress=False), r"label")
    case(A, "a KSchedule with an even k", "api", "error", lambda: pm.KSchedule((1.0,), (4,)), r"odd")
    case(A, "a KSchedule with times and ks of other lengths", "api", "error",
         lambda: pm.KSchedule((1.0, 0.5), (3,)), r"equally long")
    case(A, "a denoiser on another schedule than the sampler's", "api", "error",
         lambda: pm.ddim(den, x, steps=2, schedule="linear", progress=False), r"schedule")
    case(A, "ddim answers numpy for numpy seeds", "api", "ok", lambda: pm.ddim(den, x, [0, 1], steps=2,
                                                                               progress=False),
         check=lambda r: True if isinstance(r, np.ndarray) and r.shape == x.shape and np.isfinite(r).all() else
         f"{type(r).__name__}")


def data_cases(f: Fix):
    A = "data"
    pm, torch = f.pm, f.torch
    from PIL import Image

    load = pm.data.load
    grad16 = (np.arange(64 * 64, dtype=np.uint32) * 16).reshape(64, 64).astype(np.uint16)  # 0 .. 65520
    d16 = f.folder("png16", {"g.png": Image.fromarray(grad16)})
    case(A, "a 16-bit grey PNG gradient", "api", "ok", lambda: load(d16, size=None)[0],
         check=lambda r: True if float(r.min()) < -0.999 and float(r.max()) > 0.998 and
         float((r > 0.99).float().mean()) < 0.01 else f"range {float(r.min()):.3f}..{float(r.max()):.3f}, "
         f"{float((r > 0.99).float().mean()):.1%} white")
    mixed = f.folder("png_mixed", {"a.png": Image.fromarray(grad16[:8, :8]),
                                   "b.png": Image.fromarray((grad16[:8, :8] >> 8).astype(np.uint8))})
    case(A, "16-bit and 8-bit grey PNGs of the same picture", "api", "ok", lambda: load(mixed, size=None)[0],
         check=lambda r: True if float((r[0] - r[1]).abs().max()) < 2 / 255 else "they differ")
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    d_mix = f.folder("grey_then_colour", {"a.png": Image.fromarray(np.zeros((8, 8), np.uint8)),
                                          "b.png": Image.fromarray(red)})
    case(A, "a grey picture, then a colour one", "api", "ok", lambda: load(d_mix, size=None)[0],
         check=lambda r: True if r.shape[1] == 3 and r[1, :, 0, 0].tolist() == [1.0, -1.0, -1.0]
         else f"shape {tuple(r.shape)}: the colour was lost")
    rgba = f.rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    d_rgba = f.folder("rgba", {"a.png": Image.fromarray(rgba), "b.png": Image.fromarray(rgba)})
    case(A, "an RGBA PNG folder", "api", "error", lambda: load(d_rgba), r"a\.png.*alpha")
    case(A, "an RGBA PNG folder, alpha dropped", "api", "ok", lambda: load(d_rgba, alpha="drop", size=None)[0],
         check=lambda r: True if torch.allclose(r[0], torch.from_numpy(rgba[..., :3].transpose(2, 0, 1) / 127.5 - 1)
                                                .float(), atol=1e-6) else "not the RGB channels")
    d_la = f.folder("la", {"a.png": Image.fromarray(rgba[..., :2].copy(), mode="LA")})
    case(A, "a grey+alpha PNG", "api", "error", lambda: load(d_la), r"a\.png.*alpha")
    pal = Image.fromarray(f.rng.integers(0, 4, (8, 8), dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal.info["transparency"] = 0
    d_p = f.folder("pal", {"a.png": pal})
    case(A, "a palette PNG with a transparent colour", "api", "error", lambda: load(d_p), r"a\.png.*alpha")
    rows16 = [b"".join(struct.pack(">HHH", (x * 9000) % 65536, 65535 - x * 9000, 1000) for x in range(4))
              for _ in range(4)]
    d_rgb16 = f.folder("rgb16", {"a.png": png_bytes(4, 4, rows16, 2, 16)})
    case(A, "a 16-bit RGB PNG", "api", "ok", lambda: load(d_rgb16, size=None)[0],
         check=lambda r: True if abs(float(r[0, 1, 0, 0]) - 1.0) < 0.01 and abs(float(r[0, 0, 0, 0]) + 1) < 0.01
         else f"pixel (0, 0) = {r[0, :, 0, 0].tolist()}")
    rows16a = [b"".join(struct.pack(">HHHH", 100, 200, 300, 400) for x in range(4)) for _ in range(4)]
    d_rgba16 = f.folder("rgba16", {"a.png": png_bytes(4, 4, rows16a, 6, 16)})
    case(A, "a 16-bit RGBA PNG", "api", "error", lambda: load(d_rgba16), r"alpha")
    good = io.BytesIO()
    Image.fromarray(f.rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(good, format="PNG")
    d_trunc = f.folder("trunc", {"t.png": good.getvalue()[: len(good.getvalue()) // 2]})
    case(A, "a truncated PNG", "api", "error", lambda: load(d_trunc), r"t\.png")
    d_bomb = f.folder("bomb", {"bomb.png": png_bytes(1, 1, [b"\x00"], 0, 8, declared=(40000, 40000))})
    case(A, "a decompression-bomb PNG", "api", "error", lambda: load(d_bomb), r"bomb\.png.*(large|bomb)", fast=5)
    d_text = f.folder("text", {"x.png": b"this is not a picture"})
    case(A, "a text file named .png", "api", "error", lambda: load(d_text), r"x\.png")
    os.makedirs(f.path("empty"), exist_ok=True)
    case(A, "an empty folder", "api", "error", lambda: load(f.path("empty")), r"holds no images")
    d_txt = f.folder("txt_only", {"a.txt": b"x", "b.csv": b"y"})
    case(A, "a folder of text files", "api", "error", lambda: load(d_txt), r"holds no images")
    pics = {f"{i:03d}.png": Image.fromarray(f.rng.integers(0, 256, (8, 8), dtype=np.uint8)) for i in range(50)}
    pics["001.png"] = b"broken"
    d_many = f.folder("many", pics)
    case(A, "limit=1 stops before a broken second file", "api", "ok", lambda: load(d_many, limit=1)[0],
         check=lambda r: True if r.shape[0] == 1 else f"{r.shape[0]} images")

    def counted():
        from patchmosaic.data import images as mod
        calls, real = [0], mod.read_image

        def counting(*a, **k):
            calls[0] += 1
            return real(*a, **k)
        mod.read_image = counting
        try:
            load(d_many, indices=range(2, 50), limit=10)
        finally:
            mod.read_image = real
        return calls[0]
    case(A, "limit=10 decodes 10 of 50 files", "api", "ok", counted,
         check=lambda n: True if n <= 10 else f"{n} files decoded")
    d_cls = f.path("classes")
    for c in ("cat", "dog"):
        f.folder(os.path.join("classes", c), {"a.png": Image.fromarray(f.rng.integers(0, 256, (8, 8), np.uint8))})
    case(A, "a folder of classes, one kept", "api", "ok", lambda: load(d_cls, classes=[1])[1],
         check=lambda y: True if y.tolist() == [1] else f"labels {y.tolist()}")
    npz = [("float32 images", dict(x_train=np.zeros((4, 8, 8), np.float32)), r"uint8"),
           ("an object array", dict(x_train=np.array([None, 1], dtype=object)), r"bad\.npz"),
           ("no image key", dict(pictures=np.zeros((4, 8, 8), np.uint8)), r"image keys"),
           ("labels of the wrong length", dict(x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(3, int)),
            r"4 images but 3 labels"),
           ("negative labels", dict(x_train=np.zeros((4, 8, 8), np.uint8), y_train=-np.ones(4, int)), r"labels"),
           ("float labels", dict(x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4)), r"labels"),
           ("2-D labels", dict(x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros((4, 1), int)), r"labels"),
           ("3x3 RGB pictures, channels last", dict(x_train=np.zeros((5, 3, 3, 3), np.uint8)), r"ambiguous.*layout"),
           ("5 channels", dict(x_train=np.zeros((4, 8, 8, 5), np.uint8)), r"channel"),
           ("grey + alpha channels", dict(x_train=np.zeros((4, 8, 8, 2), np.uint8)), r"alpha"),
           ("a 2-D array", dict(x_train=np.zeros((8, 8), np.uint8)), r"\(N, H, W\)"),
           ("a 5-D array", dict(x_train=np.zeros((2, 1, 8, 8, 1), np.uint8)), r"\(N, H, W\)"),
           ("no images", dict(x_train=np.zeros((0, 8, 8), np.uint8)), r"N > 0"),
           ("bool pixels", dict(x_train=np.zeros((4, 8, 8), bool)), r"uint8"),
           ("int64 pixels", dict(x_train=np.zeros((4, 8, 8), np.int64)), r"uint8"),
           ("1-pixel images (N, 1, 1, 1)", dict(x_train=np.zeros((4, 1, 1, 1), np.uint8)), r"ambiguous")]
    for i, (name, arrays, pat) in enumerate(npz):
        def make(i=i, arrays=arrays):
            p = f.path(f"bad{i}", "bad.npz")
            os.makedirs(os.path.dirname(p), exist_ok=True)
            np.savez(p, **arrays)
            return p
        p = make()
        case(A, f"an .npz with {name}", "api", "error", lambda p=p: load(p), pat)
    np.save(f.path("single.npy"), np.zeros((4, 8, 8), np.uint8))
    os.replace(f.path("single.npy"), f.path("single.npz"))
    case(A, "an .npy file named .npz", "api", "error", lambda: load(f.path("single.npz")), r"single\.npz.*single array")
    rgb333, p333 = f.rgb333, f.p333
    case(A, "3x3 RGB pictures with layout='NHWC'", "api", "ok", lambda: load(p333, layout="NHWC", size=None)[0],
         check=lambda r: True if torch.allclose(r, torch.from_numpy(rgb333.transpose(0, 3, 1, 2) / 127.5 - 1).float(),
                                                atol=1e-6) else "not read channels-last")
    case(A, "3x3 RGB pictures with layout='NCHW'", "api", "ok", lambda: load(p333, layout="NCHW", size=None)[0],
         check=lambda r: True if torch.allclose(r, torch.from_numpy(rgb333 / 127.5 - 1).float(), atol=1e-6)
         else "not read channels-first")
    case(A, "layout='HWC'", "api", "error", lambda: load(p333, layout="HWC"), r"layout")
    case(A, "alpha='keep'", "api", "error", lambda: load(f.tiny, alpha="keep"), r"alpha")
    rgba_npz = f.npz("rgba.npz", x_train=f.rng.integers(0, 256, (4, 8, 8, 4), dtype=np.uint8))
    case(A, "an RGBA .npz with alpha dropped", "api", "ok", lambda: load(rgba_npz, alpha="drop")[0],
         check=lambda r: True if r.shape == (4, 3, 32, 32) else f"shape {tuple(r.shape)}")
    u16 = f.u16
    case(A, "a uint16 .npz", "api", "ok", lambda: load(u16, size=None)[0],
         check=lambda r: True if r.flatten().tolist() == [-1.0, 1.0] else f"{r.flatten().tolist()}")
    idx = f.path("idx")
    os.makedirs(idx, exist_ok=True)

    def idx_file(name, header, payload, gz=True):
        p = os.path.join(idx, name)
        data = header + payload
        with (gzip.open(p, "wb") if gz else open(p, "wb")) as fh:
            fh.write(data)
        return p

    hdr = bytes([0, 0, 8, 3]) + (4).to_bytes(4, "big") + (8).to_bytes(4, "big") * 2
    full = gzip.compress(hdr + bytes(256))
    trunc = os.path.join(idx, "t-images-idx3-ubyte.gz")
    open(trunc, "wb").write(full[: len(full) // 2])
    for name, path, pat in (
            ("a truncated gzip IDX file", trunc, r"t-images-idx3-ubyte\.gz"),
            ("an IDX file with a wrong magic", idx_file("m-images-idx3-ubyte", b"\x01\x02\x03\x04", b"", False),
             r"unsigned-byte IDX"),
            ("an IDX file shorter than its header says", idx_file("s-images-idx3-ubyte.gz", hdr, bytes(100)),
             r"header says"),
            ("an IDX header of huge dimensions", idx_file("h-images-idx3-ubyte.gz", bytes([0, 0, 8, 3]) +
                                                          (2**31).to_bytes(4, "big") * 3, bytes(64)), r"header says"),
            ("an IDX file of 4 dimensions", idx_file("d-images-idx3-ubyte.gz", bytes([0, 0, 8, 4]) +
                                                     (1).to_bytes(4, "big") * 4, bytes(1)), r"not images")):
        case(A, name, "api", "error", lambda path=path: load(path), pat)
    idx_file("c-images-idx3-ubyte.gz", hdr, bytes(256))
    idx_file("c-labels-idx1-ubyte.gz", bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big"), bytes(3))
    case(A, "an IDX label file of another length", "api", "error",
         lambda: load(os.path.join(idx, "c-images-idx3-ubyte.gz")), r"4 images but 3 labels")

    def cifar(name, obj, raw=None):
        d = f.path("cifar_" + name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "data_batch_1"), "wb") as fh:
            fh.write(raw if raw is not None else pickle.dumps(obj, protocol=2))
        return d

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + f.path("pwned"),))

    for name, d, pat in (
            ("without labels", cifar("nolab", {b"data": np.zeros((2, 3072), np.uint8)}), r"CIFAR"),
            ("of another shape", cifar("shape", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"3072"),
            ("of float pixels", cifar("float", {b"data": np.zeros((2, 3072)), b"labels": [0, 1]}), r"uint8"),
            ("with code in its pickle", cifar("evil", {b"data": Evil(), b"labels": []}), r"refusing"),
            ("that is not a pickle", cifar("junk", None, raw=b"\x00\x01 junk"), r"not a CIFAR"),
            ("holding a list", cifar("list", [1, 2, 3]), r"not a CIFAR")):
        case(A, f"a CIFAR batch {name}", "api", "error", lambda d=d: load(d), pat)
    for spec, pat in ((None, r"string"), (5, r"string"), ("", r"no data set")):
        case(A, f"load({spec!r})", "api", "error", lambda spec=spec: load(spec), pat)
    for name, kw, pat in (("limit=0", dict(limit=0), r"limit"), ("limit=-1", dict(limit=-1), r"limit"),
                          ("limit=True", dict(limit=True), r"limit"), ("indices=[999]", dict(indices=[999]), r"indices"),
                          ("indices=[]", dict(indices=[]), r"indices"), ("classes=[99]", dict(classes=[99]), r"class 99"),
                          ("size=0", dict(size=0), r"size"), ("size=-5", dict(size=-5), r"size"),
                          ("size='big'", dict(size="big"), r"size"), ("split='val'", dict(split="val"), r"split")):
        case(A, f"load(tiny, {name})", "api", "error", lambda kw=kw: load(f.tiny, **kw), pat)
    case(A, "a missing path", "api", "error", lambda: load(f.path("nothing.npz")), r"no data set at")
    case(A, "crop= on an .npz", "api", "error", lambda: load(f.tiny, crop=4), r"crop")
    case(A, "stride= on an .npz", "api", "error", lambda: load(f.tiny, stride=2), r"stride")
    case(A, "a named set that is not there", "api", "error", lambda: load("cifar10", root=f.path("empty")),
         r"cifar10 is not at")
    try:
        import skimage  # noqa: F401
        case(A, "skimage crops larger than the photo", "api", "error",
             lambda: load("skimage:brick", crop=10000), r"crop")
        case(A, "skimage crops of stride 0", "api", "error", lambda: load("skimage:brick", crop=64, stride=0),
             r"stride")
        case(A, "an unknown skimage photo", "api", "error", lambda: load("skimage:nothing"), r"unknown skimage")
    except ImportError:
        pass


def cli_cases(f: Fix):
    A = "cli"
    from PIL import Image

    n = [0]

    def fresh(name):
        n[0] += 1
        return f.path(f"cli{n[0]}_{name}")

    def cli(expect, name, argv, pattern="", check=None, after=None, fast=20.0):
        case(A, name, "cli", expect, lambda: (argv() if callable(argv) else argv, after), pattern, check, fast)

    sample = ["sample", "--data", f.tiny, "--steps", "2", "--k", "3", "--samples", "2", "--quiet"]
    cal = ["calibrate", "--network", f.net1, "--data", f.tiny, "--seeds", "2", "--steps", "2", "--quiet",
           "--candidates", "3,5"]
    cmp = ["compare", "--network", f.net1, "--data", f.tiny, "--seeds", "2", "--steps", "2", "--quiet",
           "--machine", "ls=3"]
    train = ["train", "--data", f.tiny, "--width", "4", "--depth", "1", "--steps", "2", "--batch-size", "4", "--quiet"]
    demo = ["demo", "--steps", "2", "--samples", "2", "--quiet"]
    ints = {
        "sample": (sample, ["--samples", "--n", "--steps", "--seed", "--limit", "--crop", "--stride", "--key-shards"]),
        "demo": (demo, ["--samples", "--steps", "--seed", "--train-per-class"]),
        "train": (train, ["--width", "--depth", "--steps", "--batch-size", "--seed", "--checkpoint-every", "--limit"]),
        "calibrate": (cal, ["--seeds", "--seed", "--steps", "--k-max", "--limit"]),
        "compare": (cmp, ["--seeds", "--batch", "--steps"]),
    }
    for cmd, (base, options) in ints.items():
        for opt in options:
            for v in ("x", "-2", "1.5", "99999999999999999999999"):
                out = ["--out", fresh("o.png" if cmd in ("sample", "demo") else "o.json" if cmd == "calibrate" else "o")]
                cli("error", f"{cmd} {opt} {v}", base + [opt, v] + out,
                    r"argument (--n/)?--samples" if opt in ("--n", "--samples") else rf"argument {opt}")
    for opt, vals in (("--lr", ["0", "-1", "nan", "inf", "1e30", "x"]), ("--weight-decay", ["-1", "inf", "nan"]),
                      ("--ema", ["1", "-0.5", "nan"])):
        for v in vals:
            cli("error", f"train {opt} {v}", train + [opt, v, "--out", fresh("t")], rf"argument {opt}")
    outs = [
        ("sample --out x.npz (the picture's path)", sample + ["--out", f.path("x.npz")], r"\.png"),
        ("sample --out /dev/full", sample + ["--out", "/dev/full"], r"/dev/full"),
        ("sample --out an existing folder", sample + ["--out", f.root], r"directory"),
        ("sample --out in a folder that cannot exist", sample + ["--out", "/proc/nope/x.png"], r"cannot write|/proc"),
        ("sample --out ''", sample + ["--out", ""], r"--out"),
        ("sample --out x (no suffix)", sample + ["--out", f.path("nosuffix")], r"\.png"),
        ("demo --out x.jpg", demo + ["--out", f.path("d.jpg")], r"\.png"),
        ("demo --samples 400000", ["demo", "--samples", "400000", "--quiet", "--out", f.path("d.png")], r"GiB"),
        ("calibrate --out ks.png", cal + ["--out", f.path("ks.png")], r"figure extension"),
        ("calibrate --out ks.txt", cal + ["--out", f.path("ks.txt")], r"\.json"),
        ("calibrate --out a folder", cal + ["--out", f.root], r"directory"),
        ("calibrate --state s.json", cal + ["--out", fresh("ks.json"), "--state", f.path("s.json")], r"\.npz"),
        ("calibrate --out /dev/full", cal + ["--out", "/dev/full"], r"/dev/full"),
        ("compare --out an existing file", cmp + ["--out", f.tiny], r"is a regular file"),
        ("compare --out /dev/null", cmp + ["--out", "/dev/null"], r"/dev/null"),
        ("train --out /dev/null", train + ["--out", "/dev/null"], r"/dev/null"),
        ("train --out an existing file", train + ["--out", f.tiny], r"is a regular file"),
        ("train --out x.safetensors in /proc", train + ["--out", "/proc/nope/x.safetensors"], r"cannot write|/proc"),
    ]
    for name, argv, pat in outs:
        cli("error", name, argv, pat, fast=10)
    after, check = npz_samples(f.path("upper.npz"), (2, 1, 32, 32))
    cli("ok", "sample --out X.PNG (upper-case suffix)", sample + ["--out", f.path("upper.PNG")], check=check,
        after=after)
    ksj = {"list.json": "[1, 2]", "even.json": json.dumps({"times": [1.0], "ks": [4]}), "bad.json": "{",
           "str.json": json.dumps({"times": "1", "ks": "3"}), "nan.json": '{"times": [NaN], "ks": [3]}',
           "empty.json": json.dumps({"times": [], "ks": []})}
    for name, text in ksj.items():
        open(f.path(name), "w").write(text)
    for spec, pat in (("4", r"odd"), ("0", r"odd"), ("-3", r"odd"), ("ramp:a:b", r"ramp"), ("ramp:15", r"ramp"),
                      ("paper:nope", r"unknown paper"), (f.path("missing.json"), r"neither"),
                      ("", r"k-schedule|--k"), ("seven", r"k-schedule|--k")) + tuple(
            (f.path(n), re.escape(n)) for n in ksj):
        cli("error", f"sample --k {os.path.basename(spec)!r}", sample + ["--k", spec, "--out", fresh("k.png")], pat)
    after, check = npz_samples(f.path("ramp.npz"), (2, 1, 32, 32))
    cli("ok", "sample --k ramp:16:4 (even ends round up to odd, as documented)", sample + [
        "--k", "ramp:16:4", "--out", f.path("ramp.png")], check=check, after=after)
    after, check = npz_samples(f.path("bigk.npz"), (2, 1, 32, 32))
    cli("ok", "sample --k 9999999 (computed at its equivalent size)", sample + ["--k", "9999999", "--out",
                                                                               f.path("bigk.png")], check=check,
        after=after)
    for canvas, pat in (("0x5", r"canvas"), ("axb", r"canvas"), ("5x", r"canvas"), ("-3x3", r"canvas"),
                        ("99999999x99999999", r"canvas"), ("100000x100000", r"GiB"), ("x5", r"canvas"),
                        ("5x5x5", r"canvas"), ("", r"canvas")):
        cli("error", f"sample --canvas {canvas}", sample + ["--canvas", canvas, "--out", fresh("c.png")], pat, fast=10)
    cli("error", "sample --canvas 1x1 (no training patch has its padding)", sample + [
        "--canvas", "1x1", "--out", fresh("c.png")], r"padding signature")
    cli("error", "sample --k a folder", sample + ["--k", f.root, "--out", fresh("k.png")], re.escape(f.root))
    cli("error", "train --device gpu", train + ["--device", "gpu", "--out", fresh("t")], r"--device")
    cli("error", "sample --classes 0,1 --labels 2", sample + ["--classes", "0,1", "--labels", "2", "--out",
                                                            fresh("l.png")], r"label")
    after, check = npz_samples(f.path("isp.npz"), (2, 1, 32, 32))
    cli("ok", "sample --machine is --provenance position", sample + ["--machine", "is", "--provenance", "position",
                                                                     "--out", f.path("isp.png")], after=after,
        check=check)
    cli("error", "sample --machine ls --canvas 16x16", sample + ["--machine", "ls", "--canvas", "16x16", "--out",
                                                                fresh("c.png")], r"training size|8x8")
    after, check = npz_samples(f.path("c16.npz"), (2, 1, 48, 48))
    cli("ok", "sample --canvas 48x48 (ELS)", sample + ["--canvas", "48x48", "--out", f.path("c16.png")], check=check,
        after=after)
    for labels, pat in (("a", r"--labels"), ("1,,2", r"--labels"), ("-1", r"--labels|label"), ("99", r"label"),
                        (",", r"--labels")):
        cli("error", f"sample --labels {labels!r}", sample + ["--labels", labels, "--out", fresh("l.png")], pat)
    for classes, pat in (("x", r"--classes"), ("99", r"class 99")):
        cli("error", f"sample --classes {classes}", sample + ["--classes", classes, "--out", fresh("l.png")], pat)
    seeds = {"nofile": None, "npy.npz": "npy", "noseeds.npz": dict(x=np.zeros((2, 1, 32, 32), np.float32)),
             "int.npz": dict(seeds=np.zeros((2, 1, 32, 32), np.int64)),
             "nan.npz": dict(seeds=np.full((2, 1, 32, 32), np.nan, np.float32)),
             "3d.npz": dict(seeds=np.zeros((2, 32, 32), np.float32)),
             "labels.npz": dict(seeds=np.zeros((2, 1, 32, 32), np.float32), labels=np.array([-1, 0])),
             "rgb.npz": dict(seeds=np.zeros((2, 3, 32, 32), np.float32)),
             "small.npz": dict(seeds=np.zeros((2, 1, 8, 8), np.float32)),
             "none.npz": dict(seeds=np.zeros((0, 1, 32, 32), np.float32))}
    for name, content in seeds.items():
        p = f.path("seeds_" + name)
        if content == "npy":
            np.save(p + ".npy", np.zeros((2, 1, 32, 32), np.float32))
            os.replace(p + ".npy", p)
        elif content is not None:
            np.savez(p, **content)
            if not p.endswith(".npz"):
                os.replace(p + ".npz", p)
        cli("error", f"compare --seeds-file {name}", cmp + ["--seeds-file", p, "--out", fresh("c")],
            r"seeds|" + re.escape(os.path.basename(p)))
    open(f.path("text.pt"), "w").write("not a network")
    os.makedirs(f.path("nockpt"), exist_ok=True)
    for name, argv, pat in (
            ("--network missing", ["--network", f.path("missing.pt")], r"no network"),
            ("--network a folder without a checkpoint", ["--network", f.path("nockpt")], r"no checkpoint"),
            ("--network a text file", ["--network", f.path("text.pt")], r"text\.pt"),
            ("--network of 3 channels on 1-channel data", ["--network", f.net3], r"3-channel"),
            ("--conditional with an unconditional network", ["--conditional"], r"unconditional"),
            ("--network conditional without labels in the seeds file", ["--network", f.netc, "--seeds-file",
                                                                         f.path("seeds_a.npz")], r"labels")):
        cli("error", f"calibrate {name}", cal + argv + ["--out", fresh("ks.json")], pat)
    for spec, pat in (("foo=3", r"--machine"), ("is=3", r"no k-schedule"), ("els", r"needs a k-schedule"),
                      ("els=4", r"els=4.*odd"), ("wiener=3", r"no k-schedule"), ("els=paper:nope", r"unknown paper")):
        cli("error", f"compare --machine {spec}", cmp + ["--machine", spec, "--out", fresh("c")], pat)
    cli("error", "compare --machine ls=3 twice", cmp + ["--machine", "ls=3", "--out", fresh("c")], r"twice")
    cli("ok", "compare --machine wiener", cmp + ["--machine", "wiener", "--out", f.path("cmp_w")],
        after=lambda: json.load(open(f.path("cmp_w", "report.json"))),
        check=lambda rep: True if "Wiener" in rep["summary"] else "no Wiener row")
    cal0 = [c for c in cal if c not in ("--candidates", "3,5")]
    for name, argv, pat in (("--candidates 3,x", ["--candidates", "3,x"], r"--candidates"),
                            ("--candidates 4", ["--candidates", "4"], r"odd"),
                            ("--candidates 999", ["--candidates", "999"], r"larger than any useful"),
                            ("--k-max 2147483647", ["--k-max", "2147483647"], r"k_max"),
                            ("--k-max 99", ["--k-max", "99"], r"k_max")):
        cli("error", f"calibrate {name}", cal0 + argv + ["--out", fresh("ks.json")], pat, fast=10)
    cli("error", "--figure-format gif", cal + ["--figure-format", "gif", "--out", fresh("ks.json")], r"figure-format")
    cli("error", "sample --backend cuda (no CUDA here)", sample + ["--backend", "cuda", "--out", fresh("b.png")],
        r"cuda|CUDA")
    rgba = f.rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    d_rgba = f.folder("cli_rgba", {"a.png": Image.fromarray(rgba), "b.png": Image.fromarray(rgba)})
    for name, argv, pat in (("sample --data missing", ["--data", f.path("nothing.npz")], r"no data set"),
                            ("sample --data an RGBA folder", ["--data", d_rgba], r"alpha"),
                            ("sample --data 3x3 RGB channels-last", ["--data", f.path("rgb333.npz")], r"layout")):
        cli("error", name, sample + argv + ["--out", fresh("d.png")], pat)
    after, check = npz_samples(f.path("rgbad.npz"), (2, 3, 32, 32))
    cli("ok", "sample --data an RGBA folder --drop-alpha", sample + ["--data", d_rgba, "--drop-alpha", "--out",
                                                                     f.path("rgbad.png")], after=after, check=check)
    after, check = npz_samples(f.path("l333.npz"), (2, 3, 32, 32))
    cli("ok", "sample --data 3x3 RGB --layout NHWC", sample + ["--data", f.path("rgb333.npz"), "--layout", "NHWC",
                                                               "--k", "3", "--out", f.path("l333.png")],
        after=after, check=check)
    cli("error", "calibrate a 1-channel network on RGB data", cal + ["--data", f.rgb, "--out", fresh("ks.json")],
        r"channel")
    cli("error", "train --arch unet --widths a,b", train + ["--arch", "unet", "--widths", "a,b", "--out", fresh("t")],
        r"--widths")
    cli("error", "train --arch unet --widths 0", train + ["--arch", "unet", "--widths", "0", "--out", fresh("t")],
        r"--widths")
    cli("error", "train --data an RGBA folder", train + ["--data", d_rgba, "--out", fresh("t")], r"alpha")
    cli("error", "train --conditional on unlabelled data", train + ["--data", f.path("u16.npz"), "--conditional",
                                                                    "--out", fresh("t")], r"class|label")
    after, check = npz_samples(f.path("is.npz"), (2, 1, 32, 32))
    cli("ok", "sample --machine is (k ignored)", sample + ["--machine", "is", "--out", f.path("is.png")],
        after=after, check=check)
    cli("ok", "train a small network", train + ["--out", f.path("cli_net")],
        after=lambda: os.path.exists(f.path("cli_net", "model.safetensors")),
        check=lambda ok: True if ok else "no checkpoint written")


def proc_cases(f: Fix):
    A = "cli"
    py = [sys.executable, "-m", "patchmosaic"]

    def proc(expect, name, argv, pattern="", env=None, interrupt=None, after=None, check=None, timeout=120):
        case(A, name, "proc", expect, lambda: (py + argv, env or {}, f.root, interrupt, after), pattern, check,
             timeout=timeout)

    proc("error", "PATCHMOSAIC_CPU_VARIANT=sse9 --version", ["--version"], r"PATCHMOSAIC_CPU_VARIANT",
         env={"PATCHMOSAIC_CPU_VARIANT": "sse9"})
    proc("error", "PATCHMOSAIC_CPU_VARIANT='' sample", ["sample", "--data", f.tiny, "--out", f.path("v.png")],
         r"PATCHMOSAIC_CPU_VARIANT", env={"PATCHMOSAIC_CPU_VARIANT": "avx1024"})
    proc("error", "no command", [], r"command|required")
    proc("error", "an unknown command", ["bogus"], r"invalid choice")
    proc("error", "an unknown option", ["sample", "--bogus"], r"unrecognized|--bogus")
    proc("ok", "sample --help", ["sample", "--help"])
    proc("ok", "--version", ["--version"])
    big = ["--data", "default", "--quiet"]
    proc("error", "Ctrl-C during sample", ["sample", "--steps", "500", "--samples", "16", "--out", f.path("int.png")]
         + big, r"interrupted; nothing was written", interrupt=6)
    proc("error", "Ctrl-C during train", ["train", "--width", "8", "--depth", "1", "--steps", "100000",
                                          "--checkpoint-every", "5", "--batch-size", "8", "--limit", "64", "--out",
                                          f.path("int_train")] + big, r"interrupted; .*checkpoint", interrupt=8)
    proc("error", "Ctrl-C during calibrate", ["calibrate", "--network", f.net1, "--data", f.tiny, "--seeds", "64",
                                              "--steps", "400", "--out", f.path("int_ks.json"), "--quiet"],
         r"interrupted; .*(state|no step)", interrupt=6)
    proc("error", "Ctrl-C during compare", ["compare", "--network", f.net1, "--data", f.tiny, "--seeds", "64",
                                            "--steps", "400", "--machine", "ls=3", "--out", f.path("int_cmp"),
                                            "--quiet"], r"interrupted; ", interrupt=6)
    proc("error", "--data mnist with $PATCHMOSAIC_DATA empty", ["sample", "--data", "mnist", "--out",
                                                               f.path("m.png")], r"mnist is not at",
         env={"PATCHMOSAIC_DATA": f.path("empty")})
    proc("error", "compare on a 3-channel reference network with MNIST",
         ["compare", "--network", os.path.join(SHARED, "models", "cifar10k_resnet_zeros_cond", "model.pt"),
          "--data", "default", "--seeds", "2", "--steps", "2", "--machine", "ls=3", "--out", f.path("ref_cmp")],
         r"3-channel") if os.path.isdir(os.path.join(SHARED, "models")) else None


AREAS = {"distributed": [distributed_cases, distributed_api_cases], "masks": [mask_cases],
         "datalocal": [datalocal_cases], "wiener": [wiener_cases], "index": [index_cases], "train": [train_cases], "samplers": [sampler_cases],
         "data": [data_cases], "cli": [cli_cases, proc_cases]}
DEFECTS = ("silent", "crash", "hang", "raw", "unclear", "late", "wrong-error")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated areas (default: all): " + ", ".join(AREAS))
    p.add_argument("--json", default=os.path.join(HERE, "results", "hostile_campaign.json"),
                   help="where to write every case's outcome")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    limit = 12 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    areas = list(AREAS) if args.only is None else args.only.split(",")
    root = tempfile.mkdtemp(prefix="hostile_")
    t_start = time.perf_counter()
    try:
        fix = Fix(root)
        for area in areas:
            for build in AREAS[area]:
                build(fix)
        if args.list:
            for c in CASES:
                print(f"{c.area:12s} {c.kind:5s} {c.expect:6s} {c.name}")
            return 0
        for i, c in enumerate(CASES):
            RUNNERS[c.kind](c)
            mark = "  " if c.outcome == "clean" else "!!"
            print(f"{mark} [{i + 1}/{len(CASES)}] {c.area}: {c.name}: {c.outcome} ({c.seconds:.1f} s)"
                  + ("" if c.outcome == "clean" else f" -- {c.detail}"), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    counts = {}
    for c in CASES:
        counts.setdefault(c.area, {}).setdefault(c.outcome, 0)
        counts[c.area][c.outcome] += 1
    total = {k: sum(v.get(k, 0) for v in counts.values()) for k in ("clean",) + DEFECTS}
    print(f"\n{len(CASES)} cases in {time.perf_counter() - t_start:.0f} s: " +
          ", ".join(f"{k} {v}" for k, v in total.items() if v))
    for area, v in counts.items():
        print(f"  {area}: " + ", ".join(f"{k} {n}" for k, n in sorted(v.items())))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": machine_line(), "command": " ".join(
            ["python bench/hostile_campaign.py"] + (argv if argv is not None else sys.argv[1:])),
            "seconds": round(time.perf_counter() - t_start), "total": total, "by_area": counts,
            "cases": [{"area": c.area, "name": c.name, "kind": c.kind, "expect": c.expect, "outcome": c.outcome,
                       "seconds": round(c.seconds, 2), "detail": c.detail} for c in CASES]}, fh, indent=1)
    return 0 if total["clean"] == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
