"""Machines and experiments over torch.distributed: the merge of partial softmax states (in one process), and
gloo jobs of 2 and 3 CPU ranks launched with torchrun (tests/dist_worker.py) whose sharded results must equal
the one-process results within the exactness tests' tolerances (test_exactness.py); a rank that dies or stalls
mid-call must stop the others with a clear message, not hang them.

The jobs start real processes (each imports torch: a few seconds); each job runs many cases at once."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.distributed import PartialState, merge
from patchmosaic.distributed.merge import merge2, pack, unpack

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
            states.append(PartialState.empty((rows,), D, torch.float64, provenance=True))
        else:
            m = lg.max(1)
            w = np.exp(lg - m[:, None])
            states.append(PartialState(torch.from_numpy(m), torch.from_numpy(w.sum(1)),
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
    e = PartialState.empty((5,), 3, torch.float64, provenance=True)
    assert torch.equal(merge([e, a, e]).out, a.out) and torch.equal(merge([e, a]).key, a.key)
    none = merge([e, e])
    assert (none.s == 0).all() and (none.out == 0).all() and (none.key == -1).all() and (none.share() == 0).all()


def test_merge_keeps_the_earlier_shard_on_a_tie_and_packs_exactly():
    one = torch.ones(2, dtype=torch.float64)
    a = PartialState(one, one, torch.zeros(2, 1), torch.tensor([3, 4]))
    b = PartialState(one, one, torch.ones(2, 1), torch.tensor([9, 9]))
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


# ------------------------------------------------------------------------------------ the process jobs
def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **extra)
    env.pop("PYTHONSTARTUP", None)
    return env


def _python():
    return [sys.executable] + (["-S"] if sys.flags.no_site else [])


def torchrun(nproc: int, mode: str, out, timeout: float = 80, **env):
    """Run ``dist_worker.py MODE OUT`` on ``nproc`` gloo ranks under torchrun; the ranks' JSON reports."""
    cmd = _python() + ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--no-python"] + \
        _python() + [WORKER, mode, str(out)]
    res = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nproc)]


@pytest.fixture(scope="module", params=[2, 3])
def key_job(request, tmp_path_factory):
    n = request.param
    out = tmp_path_factory.mktemp(f"keys{n}")
    return n, torchrun(n, "keys", out, FIRST_SEED=str(8 * (n - 2)), N_SEEDS="8")


def test_key_sharding_equals_one_process(key_job):
    """Every machine (IS, LS, ELS zeros, ELS circular, wrapped or not) on uneven shards (some empty), with class
    conditioning (a class missing on some ranks), float32 and float64: the sharded result is the one-process
    result within the exactness tolerances, provenance is global and identical, on every rank."""
    n, reports = key_job
    machines = set()
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
    assert machines == {"IS", "LS", "ELS_zeros", "ELS_circular"}
    counts = [c["counts"] for c in reports[0]["cases"]]
    assert any(0 in c for c in counts) and any(len(set(c)) > 1 for c in counts)  # empty and uneven shards


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["kill", "stall"])
def test_a_dead_or_stalled_rank_stops_the_others_with_a_message(how, tmp_path):
    """Rank 1 of 3 dies (SIGKILL) or stalls (SIGSTOP) inside a call: ranks 0 and 2 stop within the timeout
    (3 s here) with a DistributedError that says what happened, instead of hanging."""
    port, world = _free_port(), 3
    procs = []
    for r in range(world):
        env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PATCHMOSAIC_DIST_TIMEOUT="3")
        procs.append(subprocess.Popen(_python() + [WORKER, how, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        for r in (0, 2):
            procs[r].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    for r in (0, 2):
        out = procs[r].stdout.read()
        assert procs[r].returncode == 3, out
        rep = json.load(open(os.path.join(tmp_path, f"rank{r}.json")))
        assert f"rank {r} of 3" in rep["message"] and "merge of the ELS softmax states failed" in rep["message"]
        assert "died or did not answer within the timeout (3 s" in rep["message"], rep["message"]
        assert rep["seconds"] < 30
    assert procs[1].returncode == -signal.SIGKILL
