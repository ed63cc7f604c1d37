"""A trained network's input-gradient sensitivity per output pixel, the heatmaps PSPC-Flex cuts its crops from
(Niedoba et al. 2025, eq. 8):

    G_t[y, x] = E_{z ~ p_t} [ sum_c | d D(z, t)[c, y, x] / d z[c] | ]          (an H x W map per output pixel)

with ``D`` the network's posterior-mean estimate ``x0_hat = (z - b eps(z)) / a`` and ``z = a x0 + b eps`` drawn from
the forward process (``x0`` a training image, ``eps`` standard normal, from a seeded generator). The sum pairs output
channel ``c`` with input channel ``c``, as the paper's formula writes it. In the variance-exploding coordinates of the
paper the Jacobian is ``a`` times this one, a constant per time that the normalisation of each map removes. The paper
averages 1,000 noisy inputs per time on a GPU; here ``samples`` (default 4) per time, one full Jacobian each
(``torch.func.jacrev``, in chunks of output elements), so that the maps of a small network take minutes on a CPU.

The result is cached in an ``.npz`` (written atomically, read without pickle) together with what it depends on; a
computation interrupted between times resumes from a ``.partial.npz`` beside it.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from ..diffusion.denoisers import NetworkDenoiser
from ..io.files import check_output, read_npz, write_npz
from ..io.progress import Progress
from ..io.runstate import array_digest, fingerprint
from ..machines.pspc import Heatmaps


def network_heatmaps(network, images, times: Sequence[float], labels=None, *, samples: int = 4, seed: int = 0,
                     path: Optional[str] = None, chunk: int = 256, progress: bool = True) -> Heatmaps:
    """The sensitivity heatmaps of ``network`` at ``times`` (see the module).

    Args:
        network: an eps network ``net(t, x, labels)`` (run on the cosine-legacy schedule) or a
            :class:`patchmosaic.NetworkDenoiser` (its schedule, device and dtype are used).
        images: the training images ``(N, C, H, W)`` the clean ``x0`` are drawn from (numpy or torch).
        times: the times in ``(0, 1]`` to compute maps at (distinct).
        labels: ``(N,)`` labels of ``images``, for a class-conditional network (each draw conditioned on its image's
            label); None (default).
        samples: noisy inputs per time (default 4; the paper: 1,000).
        seed: the seed of the draws (default 0).
        path: an ``.npz`` to cache the result in: read when it holds the same settings, else computed and written
            (a ``.partial.npz`` beside it keeps finished times); None (default): nothing written.
        chunk: output elements per vectorised backward pass (memory against speed; default 256).
        progress: a progress bar on stderr (default True).

    Returns:
        a :class:`patchmosaic.Heatmaps` with ``maps[l, y, x]`` the ``H x W`` map of output pixel ``(y, x)``.
    """
    net = network if isinstance(network, NetworkDenoiser) else NetworkDenoiser(network)
    imgs = torch.as_tensor(np.asarray(images.detach().cpu() if torch.is_tensor(images) else images))
    if imgs.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(imgs.shape)}")
    times = [float(t) for t in times]
    if not times or any(not 0 < t <= 1 for t in times) or len(set(times)) != len(times):
        raise ValueError(f"times must be distinct and lie in (0, 1], got {times}")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    lab = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    N, C, H, W = imgs.shape
    fp = fingerprint(kind="heatmaps", network=net.describe(), data=array_digest(imgs, None if lab is None else lab),
                     times=times, samples=int(samples), seed=int(seed))
    info = {"fingerprint": fp, "samples": int(samples), "seed": int(seed), "train_images": int(N),
            "rule": "mean over noisy inputs of sum_c |d x0_hat[c, y, x] / d z[c]|"}
    partial = None if path is None else os.fspath(path) + ".partial.npz"
    if path is not None and os.path.exists(path):
        hm = Heatmaps.load(path)
        if hm.info.get("fingerprint") == fp:
            return hm
    if path is not None:  # both files writable, before any Jacobian
        check_output(path, option="path", what="the heatmaps' cache")
        check_output(partial, option="path (its .partial.npz)", what="the heatmaps' finished times")
    maps = np.zeros((len(times), H, W, H, W), np.float64)
    done = np.zeros(len(times), bool)
    if partial is not None and os.path.exists(partial):
        what = "a heatmaps' partial file (written by network_heatmaps)"
        f = read_npz(partial, what)
        if any(k not in f for k in ("fingerprint", "maps", "done")):
            raise ValueError(f"{partial} is not {what}: it needs arrays 'fingerprint', 'maps' and 'done'; delete it")
        if str(f["fingerprint"]) == fp:  # (another run's: recomputed and overwritten)
            maps, done = f["maps"].astype(np.float64), f["done"].astype(bool)
    bar = Progress(len(times) * samples, "heatmaps", enabled=progress, initial=int(done.sum()) * samples)
    for l, t in enumerate(times):
        if done[l]:
            continue
        a, b2 = net.schedule.scalar_coefficients(t)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + l)
        acc = torch.zeros((C, H, W, H, W), dtype=torch.float64)
        for _ in range(samples):
            n = int(torch.randint(N, (1,), generator=gen))
            eps = torch.randn((C, H, W), generator=gen, dtype=torch.float64)
            z = (a * imgs[n].to(torch.float64) + b2 ** 0.5 * eps).to(net.device, net.dtype)
            jac = _jacobian(net, z, t, a, b2 ** 0.5, None if lab is None else lab[n : n + 1], chunk)  # (C,H,W,C,H,W)
            acc += torch.stack([jac[c, :, :, c].abs() for c in range(C)]).double().cpu()
            bar.update(postfix=f"t={t:.3f}")
        maps[l] = (acc.sum(0) / samples).numpy()
        done[l] = True
        if partial is not None:
            write_npz(partial, fingerprint=np.array(fp), maps=maps.astype(np.float32), done=done)
    bar.close()
    hm = Heatmaps(times, maps.astype(np.float32).astype(np.float64), info)  # as the file holds them
    if path is not None:
        hm.save(path)
        if os.path.exists(partial):
            os.remove(partial)
    return hm


def _jacobian(net: NetworkDenoiser, z: torch.Tensor, t: float, a: float, b: float, label, chunk: int):
    """``d x0_hat / d z`` of one image ``z`` ``(C, H, W)``: ``(C, H, W, C, H, W)``, output first."""
    tt = torch.full((1,), t, dtype=torch.float32, device=net.device)
    lb = None if label is None else label.to(net.device)
    model = net.net

    def x0_hat(x):
        eps = model(tt, x[None], lb)[0]
        return (x - b * eps) / a

    with torch.no_grad():  # (torch.func's transforms differentiate inside; nothing outside is recorded)
        return torch.func.jacrev(x0_hat, chunk_size=max(1, int(chunk)))(z).detach()


__all__ = ["network_heatmaps"]
