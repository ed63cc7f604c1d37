"""Machines and experiments over torch.distributed: the merge of partial softmax states (in one process), and
gloo jobs of 2 and 3 CPU ranks launched with torchrun (tests/dist_worker.py) whose sharded results must equal
the one-process results within the exactness tests' tolerances (test_exactness.py); a rank that dies or stalls
mid-call must stop the others with a clear message, not hang them.

The jobs start real processes (each imports torch: a few seconds); each job runs many cases at once."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.distributed import SoftmaxState, merge
from patchmosaic.ops.state import merge2, pack, unpack

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
RANGE = 2.0


# ------------------------------------------------------------------------------ the merge, in one process
def _states(rng, parts, rows=5, D=3):
    """Partial states of ``rows`` rows over key shards of the given sizes, and the one-shard truth."""
    logits = [rng.normal(0, 3, (rows, n)) for n in parts]
    values = [rng.normal(0, 1, (n, D)) for n in parts]
    states, offset = [], 0
    for lg, v in zip(logits, values):
        if lg.shape[1] == 0:
            states.append(SoftmaxState.empty((rows,), D, torch.float64, provenance=True))
        else:
            m = lg.max(1)
            w = np.exp(lg - m[:, None])
            states.append(SoftmaxState(torch.from_numpy(m), torch.from_numpy(w.sum(1)),
                                       torch.from_numpy(w @ v / w.sum(1)[:, None]),
                                       torch.from_numpy(lg.argmax(1) + offset)))
        offset += lg.shape[1]
    lg, v = np.concatenate(logits, 1), np.concatenate(values, 0)
    w = np.exp(lg - lg.max(1)[:, None])
    return states, (w @ v / w.sum(1)[:, None], lg.argmax(1), 1 / w.sum(1))


def test_merge_is_the_softmax_over_all_keys():
    rng = np.random.default_rng(0)
    states, (out, key, share) = _states(rng, [4, 0, 7, 1])
    got = merge(states)
    assert np.abs(got.out.numpy() - out).max() < 1e-12
    assert (got.key.numpy() == key).all() and np.abs(got.share().numpy() - share).max() < 1e-12


def test_merge_is_associative_and_empty_states_are_its_identity():
    rng = np.random.default_rng(1)
    a, b, c = _states(rng, [3, 5, 2])[0]
    left, right = merge2(merge2(a, b), c), merge2(a, merge2(b, c))
    assert torch.allclose(left.out, right.out, atol=1e-13) and torch.equal(left.key, right.key)
    e = SoftmaxState.empty((5,), 3, torch.float64, provenance=True)
    assert torch.equal(merge([e, a, e]).out, a.out) and torch.equal(merge([e, a]).key, a.key)
    none = merge([e, e])
    assert (none.s == 0).all() and (none.out == 0).all() and (none.key == -1).all() and (none.share() == 0).all()


def test_merge_keeps_the_earlier_shard_on_a_tie_and_packs_exactly():
    one = torch.ones(2, dtype=torch.float64)
    a = SoftmaxState(one, one, torch.zeros(2, 1), torch.tensor([3, 4]))
    b = SoftmaxState(one, one, torch.ones(2, 1), torch.tensor([9, 9]))
    m = merge([a, b])
    assert m.key.tolist() == [3, 4] and torch.allclose(m.out, torch.full((2, 1), 0.5))
    back = unpack(pack(m), 1, torch.float32, True)
    assert torch.equal(back.key, m.key) and torch.equal(back.out, m.out) and torch.equal(back.s, m.s)


def test_a_single_process_sharded_machine_is_the_machine():
    rng = np.random.default_rng(2)
    train, x = rng.uniform(-1, 1, (5, 1, 6, 7)).astype(np.float32), rng.standard_normal((2, 1, 6, 7)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 1])
    m, s = pm.ELS(train, labels), pm.distributed.ShardedMachine("els", train, labels)
    a, pa = m.denoise(x, 0.4, 3, labels=[1, 0], return_provenance=True)
    b, pb = s.denoise(x, 0.4, 3, labels=[1, 0], return_provenance=True)
    assert np.array_equal(a, b) and np.array_equal(pa.image, pb.image) and s.describe() == m.describe()
    assert np.array_equal(m.eps(x, 0.4, 3), s.eps(x, 0.4, 3))
    with pytest.raises(ValueError, match="label 7 has no training images"):
        s.denoise(x, 0.4, 3, labels=[7, 0])
    with pytest.raises(NotImplementedError, match="not differentiable"):
        s.sensitivity(x, 0.4, 3)


def test_the_index_backend_in_one_process_and_its_bad_input():
    """``backend="index"`` in one process: LS at low t with tol = 1e-5 is the exact machine within the float32
    tolerances (mean 1e-5, max 1e-3 of the range) with the bound reported per pixel; bad options, IS, float64
    data or queries, and ``backend="index"`` on a machine built without it are refused with errors naming the
    problem, before any work."""
    rng = np.random.default_rng(5)
    train = rng.uniform(-1, 1, (6, 1, 6, 7)).astype(np.float32)
    x = (0.99 * train[[1, 4]] + 0.05 * rng.standard_normal((2, 1, 6, 7))).astype(np.float32)
    s = pm.distributed.ShardedMachine("ls", train, backend="index", index_options={"m": 4, "tol": 1e-5})
    got = s.denoise(x, 0.05, 3)
    err = np.abs(got - pm.LS(train.astype(np.float64)).denoise(x.astype(np.float64), 0.05, 3))
    assert err.mean() <= 1e-5 * RANGE and err.max() <= 1e-3 * RANGE
    assert s.last_bound.shape == (2, 6, 7) and float(s.last_bound.max()) <= 1e-5
    assert s.last_index["pixels"] == 2 * 6 * 7 and s.last_index["exact_pixels"] < 2 * 6 * 7
    SM = pm.distributed.ShardedMachine
    with pytest.raises(ValueError, match=r"unknown index option\(s\) \['mm'\]"):
        SM("els", train, backend="index", index_options={"mm": 4})
    for opts, msg in (({"tol": -1}, "tol must be a number"), ({"m": 2.5}, "m must be an int"),
                      ({"kind": "hnsw"}, "kind must be one of"), ({"exact_backend": "index"}, "exact_backend"),
                      ({"max_exact_fraction": 2}, "max_exact_fraction")):
        with pytest.raises(ValueError, match=msg):
            SM("els", train, backend="index", index_options=opts)
    with pytest.raises(ValueError, match="IS has no patches"):
        SM("is", train, backend="index")
    with pytest.raises(TypeError, match="float32; the training images are float64"):
        SM("els", train.astype(np.float64), backend="index")
    with pytest.raises(ValueError, match="index_options= configures backend='index'"):
        SM("els", train, index_options={"m": 4})
    with pytest.raises(TypeError, match="float32, got queries of torch.float64"):
        s.denoise(x.astype(np.float64), 0.05, 3)
    with pytest.raises(ValueError, match="needs a machine built with backend='index'"):
        SM("ls", train).denoise(x, 0.05, 3, backend="index")


def test_index_caches_of_other_machines_share_a_cache_dir(tmp_path):
    """The index's cache subfolders were named by shard, canvas and k only: after ELS with zero padding, ELS with
    circular padding or LS on the same cache_dir found its folder and refused it ('boundary is 'zeros' there')."""
    rng = np.random.default_rng(6)
    train = rng.uniform(-1, 1, (6, 1, 6, 7)).astype(np.float32)
    x = (0.99 * train[[1, 4]] + 0.05 * rng.standard_normal((2, 1, 6, 7))).astype(np.float32)
    opts = {"m": 4, "tol": 1e-5, "cache_dir": str(tmp_path)}
    for kind, kw, exact in (("els", {}, pm.ELS(train.astype(np.float64))),
                            ("els", {"boundary": "circular"}, pm.ELS(train.astype(np.float64), boundary="circular")),
                            ("ls", {}, pm.LS(train.astype(np.float64)))):
        got = pm.distributed.ShardedMachine(kind, train, backend="index", index_options=opts, **kw).denoise(x, 0.05, 3)
        err = np.abs(got - exact.denoise(x.astype(np.float64), 0.05, 3))
        assert err.mean() <= 1e-5 * RANGE and err.max() <= 1e-3 * RANGE, (kind, kw)
    assert len(list(tmp_path.glob("images0-6of6/*"))) == 3


# ------------------------------------------------------------------------------------ the process jobs
def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **extra)
    env.pop("PYTHONSTARTUP", None)
    return env


def _python():
    return [sys.executable] + (["-S"] if sys.flags.no_site else [])


def torchrun(nproc: int, mode: str, out, timeout: float = 80, reports: bool = True, **env):
    """Run ``dist_worker.py MODE OUT`` on ``nproc`` gloo ranks under torchrun; the ranks' JSON reports."""
    cmd = _python() + ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--no-python"] + \
        _python() + [WORKER, mode, str(out)]
    res = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    if not reports:
        return None
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nproc)]


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    """The folder the experiments of the 2-rank job leave half done and the 4-rank job resumes."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def job2(tmp_path_factory, shared_dir):
    """2 ranks: key sharding (seeds 0-7 of the cases), then calibrate and compare with the seeds spread over the
    ranks (pure query sharding), interrupted midway."""
    out = tmp_path_factory.mktemp("job2")
    reports = torchrun(2, "keys,index,exp1,mismatch,onesided", out, FIRST_SEED="0", N_SEEDS="8", PATCHMOSAIC_KEY_SHARDS="1",
                       SHARED_DIR=str(shared_dir))
    return reports, [json.load(open(os.path.join(out, f"exp{r}.json"))) for r in range(2)], _index_reports(out, 2)


@pytest.fixture(scope="module")
def job3(tmp_path_factory):
    """3 ranks: key sharding (seeds 8-15 of the cases), the data-driven locality machine, the patch index
    backend."""
    out = tmp_path_factory.mktemp("job3")
    reports = torchrun(3, "keys,datalocal,index", out, FIRST_SEED="8", N_SEEDS="8")
    locality = [json.load(open(os.path.join(out, f"datalocal{r}.json"))) for r in range(3)]
    return reports, locality, _index_reports(out, 3)


@pytest.fixture(scope="module")
def job4(tmp_path_factory, shared_dir, job2):
    """4 ranks as a 2 x 2 grid (2 key shards x 2 query shards): resumes the 2-rank job's calibration and
    comparison, samples, and runs ``patchmosaic sample`` as torchrun would."""
    out = tmp_path_factory.mktemp("job4")
    torchrun(4, "exp2,cli", out, N_SEEDS="0", PATCHMOSAIC_KEY_SHARDS="2", SHARED_DIR=str(shared_dir), timeout=120,
             reports=False)
    return [json.load(open(os.path.join(out, f"exp{r}.json"))) for r in range(4)]


def _index_reports(out, n):
    return [json.load(open(os.path.join(out, f"index{r}.json"))) for r in range(n)]


@pytest.fixture(params=[2, 3])
def key_job(request):
    n = request.param
    return n, (request.getfixturevalue("job2")[0] if n == 2 else request.getfixturevalue("job3")[0])


@pytest.fixture(params=[2, 3])
def index_job(request):
    n = request.param
    return n, request.getfixturevalue("job2" if n == 2 else "job3")[-1]


def test_data_local_over_key_shards_equals_one_process(job3):
    """ShardedDataLocal (masks from all the images, softmax over uneven shards) is the one-process DataLocal, for
    both boundaries, float32 and float64, conditional calls and calls with a time per image, on every rank."""
    reports = job3[1]
    assert len(reports) == 3 and len(set(map(str, (r["counts"] for r in reports)))) == 1
    assert len(set(reports[0]["counts"])) > 1  # uneven shards
    for rep in reports:
        assert rep["identical_on_every_rank"]
        assert len(rep["cases"]) == 12
        for c in rep["cases"]:
            assert c["same_mask"] and c["describe_same"], c
            if c["dtype"] == "float64":
                assert c["max_vs_f64"] <= 1e-9 * RANGE, c
            else:
                assert c["max_vs_f64"] <= 1e-3 * RANGE and c["mean_vs_f64"] <= 1e-5 * RANGE, c


def test_key_sharding_equals_one_process(key_job):
    """Every machine (IS, LS, ELS zeros, ELS circular, wrapped or not) on uneven shards (some empty), with class
    conditioning (a class missing on some ranks), float32 and float64, and the local ones also with a neighbourhood
    mask: the sharded result is the one-process result within the exactness tolerances, provenance is global and
    identical, on every rank."""
    n, reports = key_job
    machines, masked = set(), 0
    for rep in reports:
        assert rep["world"] == n and rep["identical_on_every_rank"]
        for case in rep["cases"]:
            machines.add(case["case"].split(" ")[0].split("(")[0])
            f64, f32 = case["float64"], case["float32"]
            assert max(f64["max_vs_f64"]) <= 1e-9 * RANGE, case
            assert max(f32["mean_vs_f64"]) <= 1e-5 * RANGE and max(f32["max_vs_f64"]) <= 1e-3 * RANGE, case
            for d in (f64, f32):
                assert d["prov_in_range"] and d["prov_label_ok"] and d["describe_same"], case
                assert d["prov_same"] == 1.0 and d["share_max_diff"] <= 1e-6, case
            if "mask_max_vs_f64" in f64:  # the local machines with a neighbourhood mask
                masked += 1
                assert max(f64["mask_max_vs_f64"]) <= 1e-9 * RANGE, case
                assert max(f32["mask_mean_vs_f64"]) <= 1e-5 * RANGE and max(f32["mask_max_vs_f64"]) <= 1e-3 * RANGE
    assert machines == {"IS", "LS", "ELS_zeros", "ELS_circular"} and masked > 0
    counts = [c["counts"] for c in reports[0]["cases"]]
    assert any(0 in c for c in counts) and any(len(set(c)) > 1 for c in counts)  # empty and uneven shards


def test_the_index_backend_equals_one_process(index_job):
    """``backend="index"`` (tests/dist_worker.py, INDEX_CASES): ELS with both boundaries (a larger canvas, an
    inverted-file index, wrapped keys among them) and LS, conditional or not, on uneven shards of 36 images
    (half MNIST-like, with repeated blank patches), at t = 0.01 and 0.05 (the index serves most pixels) and 0.15,
    0.4 (most fall back to the exact engine); in one case rank 0 computes exactly and the others use the index.
    With tol = 1e-5 the result is the one-process exact machine's within the float32 exactness tolerances
    (mean 1e-5, max 1e-3 of the data range, per query image, against float64), identical on every rank; the
    merged bound is at most tol; provenance is global and the one-process machine's, up to exact ties between
    identical patches on shards computed by different engines; the winner's weight share within 1e-3 of the
    float64 machine's. Unknown or bad index options are refused on every rank before any work."""
    n, reports = index_job
    kept = exact = 0
    for rep in reports:
        assert rep["world"] == n and rep["identical_on_every_rank"]
        assert "unknown index option(s) ['tolerance']" in rep["bad_options"]["unknown"], rep["bad_options"]
        assert "index option m must be an int >= 1" in rep["bad_options"]["m"], rep["bad_options"]
        for case in rep["cases"]:
            assert max(case["mean_vs_f64"]) <= 1e-5 * RANGE and max(case["max_vs_f64"]) <= 1e-3 * RANGE, case
            assert case["bound_max"] <= 1e-5 and case["bound_shape"] == [4] + case["bound_shape"][1:], case
            assert case["prov_in_range"] and case["prov_label_ok"] and case["prov_same_or_tied"] == 1.0, case
            assert case["share_max_diff_f64"] <= 1e-3, case
            assert len(set(case["counts"])) > 1, case  # uneven shards
            kept += case["pixels"] - case["exact_pixels"]
            exact += case["exact_pixels"]
    assert kept > 0 and exact > 0  # the index served pixels, and pixels fell back to the exact engine
    cases = [c["case"] for c in reports[0]["cases"]]
    assert {c.split(" ")[0] for c in cases} == {"ELS_zeros", "ELS_circular", "LS"}


def test_query_sharding_and_the_grid_equal_one_process(job2, job4):
    """Seeds spread over 2 ranks (job2), then over a 2 x 2 grid of key and query shards (job4): DDIM samples,
    calibration (cosines and schedule) and comparison (samples and per-seed r) equal one process's."""
    for rep in job2[1]:
        assert rep["n_query"] == 2 and rep["n_key"] == 1 and rep["ddim_max_diff"] <= 1e-5
    for rep in job4:
        assert rep["n_query"] == 2 and rep["n_key"] == 2 and rep["sharded"] == "ShardedMachine"
        assert rep["ddim_max_diff"] <= 1e-4, rep
        assert rep["schedule_same"] and rep["cosine_max_diff"] <= 1e-4, rep
        assert rep["compare_samples_max_diff"] <= 1e-4 and rep["compare_r_max_diff"] <= 1e-5, rep


def test_calibrate_and_compare_resume_with_another_number_of_ranks(job2, job4):
    """The 2-rank job stops mid-calibration (after 2 of 5 steps) and mid-comparison (the network after 2 of 5
    seeds); the 4-rank job resumes both from the files rank 0 wrote, running only the remaining steps."""
    for rep in job2[1]:
        assert rep["calibrate_interrupted"] and rep["compare_interrupted"]
    for rep in job4:
        assert not rep["calibrate_interrupted"] and not rep["compare_interrupted"]
        assert rep["calibrate_calls"] == 3, rep  # steps 2, 3, 4 only
        assert 0 < rep["compare_calls"] < 5 * 5, rep  # the network's remaining seeds only


def test_the_cli_runs_under_torchrun(job4):
    """``patchmosaic sample`` on a 2 x 2 grid: exit 0 on every rank, rank 0's samples and provenance equal one
    process's."""
    assert all(rep["cli_rc"] == 0 for rep in job4)
    assert job4[0]["cli_max_diff"] <= 1e-4 and job4[0]["cli_prov_same"] == 1.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_or_a_stalled_rank_stops_the_others_with_a_message(tmp_path):
    """Three jobs side by side: in two 2-rank jobs rank 1 dies (SIGKILL) or stalls (SIGSTOP) inside a call; in a
    3-rank job it dies. Every other rank stops within the timeout (3 s here) with a DistributedError that says
    what happened and names rank 1 (and only rank 1), instead of hanging."""
    jobs = {"kill": ("kill", 2), "stall": ("stall", 2), "kill3": ("kill", 3)}
    procs = {}
    for job, (how, n) in jobs.items():
        port = _free_port()
        os.makedirs(tmp_path / job)
        for r in range(n):
            env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), PATCHMOSAIC_DIST_TIMEOUT="3")
            procs[job, r] = subprocess.Popen(_python() + [WORKER, how, str(tmp_path / job)], env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for (job, r), p in procs.items():
            if r != 1:
                p.wait(timeout=60)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    named = {"kill": "rank 1 died (its process has ended)", "stall": "rank 1 did not answer within 3 s (its process "
             "is stopped)"}
    for job, (how, n) in jobs.items():
        for r in (0, 2)[:n - 1]:
            out = procs[job, r].stdout.read()
            assert procs[job, r].returncode == 3, out
            msg = json.load(open(tmp_path / job / f"rank{r}.json"))["message"]
            head = f"rank {r} of {n}: the merge of the ELS softmax states failed: "
            assert msg.startswith(head + named[how] + ". "), msg
            assert "rank 0" not in msg[len(head):] and "rank 2" not in msg[len(head):], msg  # survivors not blamed
            assert "within the timeout (3 s" in msg, msg
            assert json.load(open(tmp_path / job / f"rank{r}.json"))["seconds"] < 20
        assert procs[job, 1].returncode == -signal.SIGKILL


# --------------------------------------------------------- issue 28: the ranks agree before their first collective
def _ranks(tmp_path, job: str, argvs, timeout: float = 90):
    """Start one ``python -m patchmosaic`` process per rank of a gloo job, each with its own arguments (as a launcher
    that gave each rank other inputs would); ``[(exit code, stderr)]`` per rank."""
    port = _free_port()
    procs = []
    for r, argv in enumerate(argvs):
        env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(len(argvs)), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PATCHMOSAIC_DIST_TIMEOUT="60")
        procs.append(subprocess.Popen(_python() + ["-m", "patchmosaic"] + argv, env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def test_ranks_given_different_inputs_stop_before_the_run_naming_fields_and_ranks(tmp_path):
    """Issue 28: two ranks given different data of the same shape, k-schedules, seeds, labels or numbers of samples
    used to exit 0 with mixed samples (or die in gloo with SIGABRT for a different --n). Now every rank stops with
    exit 2 before any collective of the run, naming each differing field and which rank holds which value; a rank
    that fails before the run (a missing file) stops the others with its message."""
    rng = np.random.default_rng(28)
    for name in ("a", "b"):  # the same shape, other pixels
        np.savez(tmp_path / f"{name}.npz", x_train=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
                 y_train=np.arange(12) % 3)
    common = ["sample", "--steps", "2", "--quiet", "--out", "s.png"]
    jobs = {
        "settings": [common + ["--data", "a.npz", "--samples", "2", "--k", "3", "--seed", "0"],
                     common + ["--data", "a.npz", "--samples", "3", "--k", "5", "--seed", "1"]],
        "content": [common + ["--data", "a.npz", "--labels", "0,1", "--k", "3"],
                    common + ["--data", "b.npz", "--labels", "1,0", "--k", "3"]],
        "missing": [common + ["--data", "a.npz", "--k", "3"], common + ["--data", "none.npz", "--k", "3"]],
    }
    results = {job: _ranks(tmp_path, job, argvs) for job, argvs in jobs.items()}
    for job, res in results.items():
        assert [code for code, _ in res] == [2, 2], (job, res)
        for code, err in res:
            assert err.strip().count("\n") == 0 and "Traceback" not in err, (job, err)
    for r, (_, err) in enumerate(results["settings"]):
        assert f"patchmosaic sample (rank {r}): error: the ranks were given different inputs" in err, err
        for field in ("n (2 on rank 0; 3 on rank 1)", "seed (0 on rank 0; 1 on rank 1)", "k_schedule ("):
            assert field in err, (field, err)
        assert ", data (" not in err and ": data (" not in err and "labels (" not in err, err  # only what differs
    for _, err in results["content"]:
        assert ": data (" in err and ", labels (" in err and " n (" not in err, err
    assert "no data set at 'none.npz'" in results["missing"][1][1]
    assert "stopped before the run (patchmosaic sample) because a rank failed (rank 1: no data set at 'none.npz'" in \
        results["missing"][0][1]
    assert not (tmp_path / "s.png").exists()


def test_the_readme_torchrun_command_runs_as_written(tmp_path):
    """Issue 28: the README's torchrun command is run exactly as it is written there (torchrun is the console script
    of torch.distributed.run; where it is not on the PATH, that module runs it)."""
    import shlex
    import shutil

    readme = open(os.path.join(HERE, "..", "README.md")).read()
    lines = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith("torchrun ")]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else _python() + ["-m", "torch.distributed.run"]
    res = subprocess.run(launcher + argv[1:], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    n = int(argv[argv.index("--samples") + 1])
    with np.load(tmp_path / argv[argv.index("--out") + 1].replace(".png", ".npz")) as z:
        assert z["samples"].shape == (n, 1, 32, 32) and np.isfinite(z["samples"]).all()
    assert (tmp_path / argv[argv.index("--out") + 1]).exists()


def test_launch_settings_from_the_environment_are_named(monkeypatch):
    """Issue 28 campaign: $PATCHMOSAIC_KEY_SHARDS and $PATCHMOSAIC_DIST_TIMEOUT that are not numbers said only
    "invalid literal for int()" / "could not convert string to float"."""
    from patchmosaic.distributed import launch
    from patchmosaic.distributed.queries import Layout

    monkeypatch.setenv("PATCHMOSAIC_KEY_SHARDS", "two")
    with pytest.raises(ValueError, match=r"\$PATCHMOSAIC_KEY_SHARDS is a number of ranks, got 'two'"):
        Layout()
    monkeypatch.setenv("PATCHMOSAIC_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"\$PATCHMOSAIC_DIST_TIMEOUT: the distributed timeout is a number"):
        launch.timeout_seconds()
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive seconds"):
            launch.timeout_seconds(bad)
    with pytest.raises(ValueError, match="key_shards must divide the 1 rank"):
        Layout(2)


def test_api_calls_given_different_inputs_per_rank_refuse_on_every_rank(job2):
    """Issue 28: Layout.sample with other seeds per rank, calibrate with other seeds per rank (its state's
    fingerprint), and a key-sharded machine cut from other data per rank each refuse on every rank, naming the
    ranks, before mixing anything."""
    for rep in job2[1]:
        sample, calib, shards = rep["mismatch"]
        assert sample and "Layout.sample: the ranks were given different seeds" in sample and "on rank 1" in sample
        assert calib and "the ranks were given different runs" in calib and "on rank 0" in calib
        assert shards and "cut from different training sets" in shards


def test_a_failure_on_one_rank_is_raised_on_every_rank_and_the_ranks_stay_in_step(job2):
    """A NaN query where only rank 0 holds keys, a NaN in rank 1's slice, a time out of range in a class only
    rank 1 holds: the ranks that did not compute waited in the exchange and blamed the failing rank as dead (or,
    caught and retried, returned the next call's result for the bad one). Now each is the one-process error on
    every rank (the others' naming the failing rank), and the next call is in step. Also: IS with the torch engine
    on one rank and the CPU engine on the other merged two conventions of the partial maximum (1.6 off); a
    DataLocal whose ranks pass their own shards as statistics, DDPM generators in other states per rank, and IS's
    patch-size sweep were taken silently."""
    for r, rep in enumerate(job2[1]):
        got = rep["one_sided"]
        other = "" if r == 0 else r" \(rank 0, its part of the call\)"
        assert re.fullmatch(r"ValueError: x contains NaN or infinite values \(shape \(1, 1, 6, 6\)\)" + other,
                            got["nan_query"]), got
        assert got["after_diff"] <= 1e-12
        assert re.fullmatch(r"ValueError: images contains NaN .*" + ("" if r == 1 else r" \(rank 1, building the "
                                                                    r"machine\)"), got["nan_shard"]), got
        assert re.fullmatch(r"ValueError: t must lie in \(0, 1\], got 1.5" + ("" if r == 1 else r" \(rank 1, its "
                                                                             r"part of the call\)"),
                            got["t_range"]), got
        assert got["is_mixed_diff"] <= 1e-12
        assert "the IS machine has none" in got["is_denoise_ks"]
        assert "the ranks' neighbourhood rules differ" in got["datalocal_own_statistics"]
        assert "different seeds, labels, generator states" in got["ddpm_generators"]
        assert got["ddpm_call0"] is None and got["ddpm_call1"] is None, got  # (reseeded alike after each call)
