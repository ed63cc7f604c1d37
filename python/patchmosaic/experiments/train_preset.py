"""``patchmosaic train --preset NAME`` and ``--list-presets``: train a network from a named recipe
(:mod:`patchmosaic.networks.presets`), with a time estimate measured on this machine first, then write its
reference samples (``ddim20_samples.npz``: the network's 20-step DDIM samples from fixed seeds, in the format of
the reference networks' files; ``NAME.ddim20_samples.npz`` beside a ``NAME.safetensors`` checkpoint).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch

from ..networks import presets as P
from ..ops.checks import check_cuda_inputs
from ..networks.timing import duration, estimate_text, step_seconds

SAMPLES_FILE = "ddim20_samples.npz"
REFERENCE_SEEDS = 128  # seeds of a reference samples file, as in shared/models


def list_presets(device: str = "cpu", measure: bool = True, say: Callable[[str], None] = print) -> None:
    """One line per preset: data, network, steps x batch, and the time on this machine (a few timed steps,
    scaled; ``measure=False`` leaves it out) beside the reference run's time where it had one."""
    check_cuda_inputs(device=device)  # (a CUDA device on a torch without CUDA: refused before any line)
    say(f"presets (time: measured here on {'the CPU' if device == 'cpu' else device}, a few steps scaled; "
        "reference: the reference network's own run):")
    for name, r in P.presets().items():
        net = r["network"]
        arch = (f"ResNet width {net['width']} depth {net['depth']}" if net["arch"] == "resnet" else
                f"UNet {'/'.join(map(str, net['widths']))}" + (" + attention" if net.get("attention") else ""))
        data = r["data"] + (f" (first {r['limit']})" if r["limit"] else "")
        tr = r["train"]
        line = (f"  {name}: {data}; {arch}, {net['padding']} padding, "
                f"{'conditional' if r['conditional'] else 'unconditional'}; {tr['steps']} steps x {tr['batch_size']}")
        if measure:
            cfg = P.network_config(r, r["channels"], r["num_classes"])
            t = step_seconds(cfg, tr["batch_size"], device=device, steps=1)
            line += f"; here about {duration(t['seconds_per_step'] * tr['steps'])}"
        ref = r.get("reference")
        if ref:
            line += f"; reference: {ref['seconds']} s on an {ref['device']}"
        if P.trained_path(name):
            line += f"; shipped (--network {P.PREFIX}{name})"
        say(line)


def run_preset(name: str, out: str, overrides: Optional[dict] = None, *, device: str = "cpu",
               checkpoint_every: int = 500, progress: bool = True, override: bool = False, samples: bool = True,
               data_options: Optional[dict] = None, say: Callable[[str], None] = print) -> dict:
    """Train preset ``name`` (with ``overrides``, see :func:`patchmosaic.networks.presets.recipe`) into ``out``.

    Prints the recipe's changes, then a time estimate (a few timed steps on ``device``, scaled), then trains
    (resuming a checkpoint in ``out``), then writes ``out/ddim20_samples.npz`` (``NAME.ddim20_samples.npz`` beside an
    ``out`` of ``NAME.safetensors``) unless ``samples`` is False or the file there holds this network's samples.
    ``data_options``: further arguments of :func:`patchmosaic.data.load` (``download``, ``layout``, ``alpha``).
    Returns ``{"recipe", "changed", "estimate", "network"}``.
    """
    from .. import data
    from ..io.runstate import module_digest
    from ..networks import load, train
    from ..networks.checkpoint import side_file

    check_cuda_inputs(device=device)  # before the data are loaded or a step is timed
    r, changed = P.recipe(name, overrides)
    if changed:
        say(f"preset {name} with " + ", ".join(f"{k}={new!r} (preset: {old!r})" for k, old, new in changed))
    try:
        images, labels = data.load(r["data"], limit=r["limit"], **(data_options or {}))
    except ValueError as e:
        raise ValueError(f"preset {name} trains on {r['data']}: {e}") from None
    ncls = int(labels.max()) + 1 if r["conditional"] else 0
    if r["conditional"] and ncls < 2:
        raise ValueError(f"preset {name} is class-conditional, but every image of {r['data']} has label 0")
    cfg = P.network_config(r, images.shape[1], ncls)
    done = _step_done(out)
    timing = step_seconds(cfg, r["train"]["batch_size"], device=device)
    say(f"preset {name}: {len(images)} images of {r['data']}; " + estimate_text(timing, r["train"]["steps"], done))
    ref = r.get("reference")
    if ref and torch.device(device).type == "cpu":
        say(f"  (meant for a GPU: the reference network's run took {ref['seconds']} s on an {ref['device']}; "
            "--device cuda)")
    tc = P.train_config(r, device=device, checkpoint_every=checkpoint_every)
    net = train(cfg, images, labels, out=out, config=tc, progress=progress, override=override)
    if samples:
        path = side_file(out, SAMPLES_FILE)
        if _samples_weights(path) != module_digest(net):  # (samples of other weights: of an earlier step, say)
            write_reference_samples(net, path, step=load(out)[1]["step"], device=device, progress=progress)
    return {"recipe": r, "changed": changed, "estimate": timing, "network": net}


def reference_seeds(channels: int, num_classes: int, n: int = REFERENCE_SEEDS, seed: int = 0):
    """``(seeds (n, channels, 32, 32) float32, labels (n,) int64)``: standard-normal noise from a generator
    seeded with ``seed``; labels cycle through the classes (all 0 for an unconditional network)."""
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, channels, 32, 32, generator=gen)
    y = torch.arange(n, dtype=torch.int64) % num_classes if num_classes else torch.zeros(n, dtype=torch.int64)
    return x1, y


def write_reference_samples(net, path: str, *, step: Optional[int] = None, device="cpu", progress: bool = False,
                            n: int = REFERENCE_SEEDS) -> None:
    """The network's deterministic 20-step DDIM samples from :func:`reference_seeds` as an ``.npz`` of ``seeds``,
    ``labels``, ``samples`` (the reference networks' format) plus ``step`` (the checkpoint's step) and ``weights``
    (the SHA-256 of the network's weights, :func:`patchmosaic.io.runstate.module_digest`)."""
    from ..diffusion.denoisers import NetworkDenoiser
    from ..diffusion.samplers import ddim
    from ..io.files import write_npz
    from ..io.runstate import module_digest
    from ..networks import network_channels, network_classes

    channels, classes = network_channels(net), network_classes(net) or 0
    x1, y = reference_seeds(channels, classes, n)
    den = NetworkDenoiser(net, device=device)
    samples = ddim(den, x1.to(device), y if classes else None, steps=20, progress=progress)
    write_npz(path, seeds=x1.numpy(), labels=y.numpy(), samples=samples.float().cpu().numpy(),
              step=np.int64(-1 if step is None else step), weights=np.str_(module_digest(net)))


def _step_done(out: str) -> int:
    from ..networks import load

    try:
        return int(load(out, ema=False)[1].get("step", 0))
    except ValueError:
        return 0


def _samples_weights(path: str) -> Optional[str]:
    """The digest of the weights whose samples the file ``path`` holds (None: no file, or one without it)."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        return str(z["weights"]) if "weights" in z.files else None
