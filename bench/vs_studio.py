"""PCA-locality and the smoothed closed-form denoiser against the Analytic Diffusion Studio's own implementations,
on the same CPU, data and noise levels, in one process (issue 25).

The Studio (github.com/analytic-diffusion/analytic-diffusion-studio, CC BY-NC) is not part of this project: pass a
checkout with ``--studio PATH`` (its ``src/`` is imported from there; it needs ``diffusers``; its data package,
which needs torchvision, is replaced by a stand-in holding the data loader, the only thing its models read). Both
sides run the same images (raw pixels scaled to [-1, 1] at their own size, as the Studio does), its DDIM schedule
(linear betas 1e-4..0.02 over 1000 steps; ours reads the same alpha_bar at the same timesteps through a schedule
callable) and its settings: PCA-locality temperature 1, the data set's threshold, data-loader batches of 512; the
smoothed denoiser 10 draws, its smoothing, the top-200 FAISS neighbours on its side.

Per noise level (the Studio's 20 DDIM timesteps): one denoiser call each side on the same query (B = 1), cold (our
first call at a time builds that time's mask; theirs rebuilds it on every call) and warm, and how far the outputs
are apart: theirs against our exact machine (their approximation) and against our batch-averaged option (the same
approximation: it should agree to float rounding). Then a 20-step sample each side. Writes JSON and prints a table.

    OMP_WAIT_POLICY=PASSIVE python bench/vs_studio.py --studio /path/to/analytic-diffusion-studio --data mnist

Times: wall seconds and the process's CPU seconds (every thread) per call; on a shared machine the CPU seconds are
the figure to compare (OMP_WAIT_POLICY=PASSIVE keeps idle OpenMP threads from spinning into them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import patchmosaic as pm  # noqa: E402
from common import SHARED  # noqa: E402

THRESHOLD = {"mnist": 0.005, "cifar10": 0.05}  # the Studio's configs/pca_locality
SMOOTHING = {"mnist": 1.0, "cifar10": 0.1}  # its configs/scfdm


def raw_images(name: str, n: int) -> np.ndarray:
    """(N, C, H, W) float32 in [-1, 1] at the data set's own size (MNIST 28x28), as the Studio reads them."""
    if name == "mnist":
        x = np.load(os.path.join(SHARED, "data", "mnist.npz"))["x_train"][:n][:, None]
    else:
        x = np.load(os.path.join(SHARED, "data", "cifar10_10k.npz"))["x_train"][:n]
        if x.shape[-1] == 3:
            x = x.transpose(0, 3, 1, 2)
    return (x.astype(np.float32) / 255.0 - 0.5) * 2


def studio_modules(path: str):
    """The Studio's model modules, imported from a checkout, with a stand-in for its data package."""
    src = os.path.join(path, "src")
    if not os.path.isdir(os.path.join(src, "local_diffusion")):
        raise SystemExit(f"--studio {path}: no src/local_diffusion there (a checkout of analytic-diffusion-studio)")
    sys.path.insert(0, src)
    stub = types.ModuleType("local_diffusion.data")

    @dataclasses.dataclass
    class DatasetBundle:  # what its models read of a data set
        name: str
        dataset: object
        dataloader: object
        resolution: int
        in_channels: int
        split: str = "train"
        postprocess: object = None

    stub.DatasetBundle = DatasetBundle
    sys.modules["local_diffusion.data"] = stub
    import local_diffusion.models.pca_locality as pca  # noqa: E402
    import local_diffusion.models.scfdm as scfdm  # noqa: E402

    return DatasetBundle, pca, scfdm


def bundle(DatasetBundle, name, x: np.ndarray):
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x))
    dl = torch.utils.data.DataLoader(ds, batch_size=512, shuffle=False, drop_last=False)
    return DatasetBundle(name=name, dataset=ds, dataloader=dl, resolution=x.shape[-1], in_channels=x.shape[1])


def studio_schedule(alphas_cumprod: np.ndarray):
    """alpha_bar(t) equal to the Studio's alphas_cumprod[tau] at t = (tau + 1) / 1000 (linear in between)."""
    grid = (np.arange(len(alphas_cumprod)) + 1) / len(alphas_cumprod)
    ac = np.asarray(alphas_cumprod, np.float64)
    return pm.schedules.FromCallable(lambda t: np.interp(np.asarray(t, np.float64), grid, ac), name="studio_ddim")


def same_mask_batch_averaged(machine, xq, t, mask, batch):
    """The batch-averaged softmax (the Studio's streaming average) on the engine, with a given (D, D) mask: the
    check that the approximation itself is reproduced where the masks agree."""
    from patchmosaic import ops

    hp, he, hw = ops.dense_table(mask.T.to(torch.float64))
    D = mask.shape[0]
    table = (hp, he, None, torch.arange(D + 1), torch.arange(D))
    a, inv, _ = machine.coefficients(t, 1)
    none = ops.LabelIndex.from_labels(None).tensors()
    train = machine.train_as(xq.dtype, torch.device("cpu"))
    acc, n = 0, 0
    for i0 in range(0, machine.N, batch):
        rows = ops.aligned_softmax(train[i0 : i0 + batch], xq, a, inv, None, None, *none, *table, False, "cpu", 0, 0)[0]
        acc, n = acc + rows, n + 1
    return (acc / (n + 1e-8)).reshape(xq.shape)


def timed(fn):
    """``(result, wall seconds)``; the CPU seconds of the whole process (all its threads) go to cpu_of(). The
    machine is shared: wall times move with the load of other processes, CPU seconds much less (with
    OMP_WAIT_POLICY=PASSIVE, so that idle OpenMP threads do not spin)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    timed.last_cpu = cpu
    return out, wall


def diff(u, v):
    d = (torch.as_tensor(u).double() - torch.as_tensor(v).double()).abs()
    return float(d.max()), float(d.mean())


def run(args, DatasetBundle, pca_mod, scfdm_mod, name, n):
    x = raw_images(name, n)
    N, C, H, W = x.shape
    b = bundle(DatasetBundle, name, x)
    out = {"data": name, "n_train": N, "shape": [C, H, W], "threshold": THRESHOLD[name],
           "smoothing": SMOOTHING[name], "calls": [], "samples": {}}
    tmp = tempfile.mkdtemp(prefix="studio_")
    theirs_pca, t_setup = timed(lambda: pca_mod.PCALocalityDenoiser(
        b, "cpu", args.steps, params={"temperature": 1.0, "mask_threshold": THRESHOLD[name],
                                       "wiener_path": os.path.join(tmp, "wiener")}).train(b))
    sched = studio_schedule(theirs_pca.scheduler.alphas_cumprod.numpy())
    t_of = lambda tau: (int(tau) + 1) / 1000.0  # noqa: E731
    ours, o_setup = timed(lambda: pm.PCALocality(x, threshold=THRESHOLD[name], schedule=sched))
    ours_ba = pm.PCALocality(x, threshold=THRESHOLD[name], schedule=sched, batch_average=512)
    out["setup_seconds"] = {"studio_pca": t_setup, "ours_pca": o_setup}
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, C, H, W, generator=gen)
    B = args.batch
    grid = [t_of(tau) for tau in theirs_pca.scheduler.timesteps.tolist()] + [0.0]
    x1 = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1))
    for tau in ([] if args.skip_pca else theirs_pca.scheduler.timesteps.tolist()):
        t = t_of(tau)
        a = float(np.sqrt(sched.alpha_bar(t)))
        xq = (a * torch.from_numpy(x[tau % N : tau % N + 1]) + float(np.sqrt(1 - a * a)) * q).float()
        th, th_s = timed(lambda: theirs_pca.denoise(xq, torch.tensor(tau)))
        th_c = timed.last_cpu
        _, th_s2 = timed(lambda: theirs_pca.denoise(xq, torch.tensor(tau)))
        th_c = min(th_c, timed.last_cpu)
        ex, ours_cold = timed(lambda: ours.denoise(xq, t))
        cold_c = timed.last_cpu
        _, ours_warm = timed(lambda: ours.denoise(xq, t))
        warm_c = timed.last_cpu
        ba = ours_ba.denoise(xq, t)
        sizes = ours.neighbourhood_sizes(t).double()
        # their mask (float32 arithmetic) against ours (float64): the global threshold follows max |M|, which a
        # near-constant pixel's tiny diagonal makes large, so the two can differ where entries sit near it
        their_mask = theirs_pca._projection_mask(int(tau))[0] > 0
        our_mask = ours.mask(t)
        same = same_mask_batch_averaged(ours, xq, t, their_mask, 512)
        out["calls"].append({"timestep": int(tau), "t": t, "studio_s": min(th_s, th_s2), "ours_cold_s": ours_cold,
                             "ours_warm_s": ours_warm, "studio_cpu_s": th_c, "ours_cold_cpu_s": cold_c,
                             "ours_warm_cpu_s": warm_c, "mean_hood": float(sizes.mean()),
                             "mask_entries_differing": int((their_mask != our_mask).sum()),
                             "mask_entries": int(our_mask.numel()), "mean_hood_studio": float(their_mask.sum(0).double().mean()),
                             "studio_vs_exact": diff(th, ex), "studio_vs_ours_batch_averaged": diff(th, ba),
                             "studio_vs_ours_batch_averaged_on_their_mask": diff(th, same)})
        c = out["calls"][-1]
        print(f"{name} N={N} tau={tau:4d} t={t:.3f} hood {c['mean_hood']:6.1f} (theirs {c['mean_hood_studio']:6.1f}, "
              f"{c['mask_entries_differing']} entries differ): CPU seconds studio {th_c:.3f}, ours cold {cold_c:.3f} warm "
              f"{warm_c:.3f} (wall {c['studio_s']:.3f} / {ours_cold:.3f} / {ours_warm:.3f}); |studio - exact| max "
              f"{c['studio_vs_exact'][0]:.3g}; |studio - ours batch-averaged| max {c['studio_vs_ours_batch_averaged'][0]:.2g}, "
              f"on their mask {c['studio_vs_ours_batch_averaged_on_their_mask'][0]:.2g}", flush=True)
    # a 20-step sample each side (B images); ours on the same timesteps (t = (tau + 1) / 1000, then 0)
    if not args.skip_pca:
        pca_samples(out, theirs_pca, x, sched, grid, x1, name, N)
    if not args.skip_scfdm:
        scfdm_runs(args, out, b, tmp, x, sched, grid, x1, name, N, t_of)
    return out


def pca_samples(out, theirs_pca, x, sched, grid, x1, name, N):
    B = x1.shape[0]
    C, H, W = x.shape[1:]
    _, th_sample = timed(lambda: theirs_pca.sample(num_samples=B, batch_size=B, generator=torch.Generator().manual_seed(1)))
    th_sample_c = timed.last_cpu
    fresh = pm.PCALocality(x, threshold=THRESHOLD[name], schedule=sched)  # no mask cached: every step builds its own
    _, o_sample = timed(lambda: pm.ddim(pm.MachineDenoiser(fresh), x1, grid=grid, progress=False))
    o_sample_c = timed.last_cpu
    _, o_again = timed(lambda: pm.ddim(pm.MachineDenoiser(fresh), x1 + 0.1, grid=grid, progress=False))
    o_again_c = timed.last_cpu
    out["samples"]["pca"] = {"batch": B, "steps": len(grid) - 1, "studio_s": th_sample, "ours_s": o_sample,
                             "ours_next_batch_s": o_again, "studio_cpu_s": th_sample_c, "ours_cpu_s": o_sample_c,
                             "ours_next_batch_cpu_s": o_again_c}
    print(f"{name} N={N} PCA-locality 20-step sample of {B}: CPU seconds studio {th_sample_c:.2f}, ours "
          f"{o_sample_c:.2f} ({th_sample_c / o_sample_c:.1f}x; the next batch, masks kept: {o_again_c:.2f}, "
          f"{th_sample_c / o_again_c:.1f}x); wall {th_sample:.2f} / {o_sample:.2f} / {o_again:.2f} s", flush=True)


def scfdm_runs(args, out, b, tmp, x, sched, grid, x1, name, N, t_of):
    B = x1.shape[0]
    C, H, W = x.shape[1:]
    scfdm_mod = args.scfdm_module
    theirs_s, s_setup = timed(lambda: scfdm_mod.SmoothedCFDM(
        b, "cpu", args.steps, params={"temperature": 1.0, "num_neighbors": 200, "num_noise": 10,
                                       "smoothing_std": SMOOTHING[name], "index_path": os.path.join(tmp, "opt")}).train(b))
    ours_s = pm.SmoothedCFDM(x, smoothing=SMOOTHING[name], samples=10, schedule=sched)
    calls = []
    # our first call takes the images' squared norms once (setup, like their index): timed apart
    timed(lambda: ours_s.denoise(torch.zeros(1, C, H, W), 0.5))
    first_cpu = timed.last_cpu
    print(f"{name} N={N} scfdm: our first call (the squared norms) {first_cpu:.3f} CPU s", flush=True)
    for tau in theirs_s.scheduler.timesteps.tolist():  # every timestep of the sample
        t = t_of(tau)
        xq = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(tau))
        th, thc, oo, ooc = [], [], [], []
        for _ in range(args.repeat):  # each side's best of --repeat, alternating
            _, w = timed(lambda: theirs_s.denoise(xq, torch.tensor(tau), generator=torch.Generator().manual_seed(2)))
            th.append(w), thc.append(timed.last_cpu)
            _, w = timed(lambda: ours_s.denoise(xq, t))
            oo.append(w), ooc.append(timed.last_cpu)
        th, thc, oo, ooc = min(th), min(thc), min(oo), min(ooc)
        calls.append({"timestep": int(tau), "studio_s": th, "ours_s": oo, "studio_cpu_s": thc, "ours_cpu_s": ooc})
        print(f"{name} N={N} scfdm tau={tau:4d}: CPU seconds studio {thc:.4f}, ours {ooc:.4f} ({thc / ooc:.1f}x; "
              f"wall {th:.4f} / {oo:.4f})", flush=True)
    _, th_sample = timed(lambda: theirs_s.sample(num_samples=B, batch_size=B,
                                                 generator=torch.Generator().manual_seed(1)))
    thc = timed.last_cpu
    _, o_sample = timed(lambda: pm.ddim(pm.MachineDenoiser(ours_s), x1, grid=grid, progress=False))
    ooc = timed.last_cpu
    out["scfdm"] = {"setup_s": s_setup, "calls": calls, "ours_first_call_cpu_s": first_cpu}
    out["samples"]["scfdm"] = {"batch": B, "studio_s": th_sample, "ours_s": o_sample, "studio_cpu_s": thc,
                               "ours_cpu_s": ooc}
    print(f"{name} N={N} scfdm 20-step sample of {B}: CPU seconds studio {thc:.2f}, ours {ooc:.2f} "
          f"({thc / ooc:.1f}x); wall {th_sample:.2f} / {o_sample:.2f} s", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studio", default=os.environ.get("STUDIO"), help="a checkout of analytic-diffusion-studio")
    p.add_argument("--data", default="mnist", help="comma-separated: mnist, cifar10")
    p.add_argument("--n-train", default="2000", help="comma-separated training-set sizes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1, help="images of the 20-step samples")
    p.add_argument("--skip-scfdm", action="store_true")
    p.add_argument("--skip-pca", action="store_true", help="the smoothed denoiser only")
    p.add_argument("--repeat", type=int, default=3, help="the smoothed denoiser's calls: each side's best of this many")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not args.studio:
        raise SystemExit("--studio PATH (or $STUDIO) is required: a checkout of analytic-diffusion-studio")
    from threadpoolctl import threadpool_info

    DatasetBundle, pca_mod, scfdm_mod = studio_modules(args.studio)
    args.scfdm_module = scfdm_mod
    report = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "blas": [(i.get("internal_api"), i.get("architecture")) for i in threadpool_info()], "runs": []}
    for name in args.data.split(","):
        for n in (int(v) for v in args.n_train.split(",")):
            report["runs"].append(run(args, DatasetBundle, pca_mod, scfdm_mod, name, n))
            if args.json:
                pm.io.runstate.write_json(args.json, report)


if __name__ == "__main__":
    main()
