"""Training by eps-prediction (spec section 1): ``x_t = a x0 + b eps``, loss ``|net(t, x_t, y) - eps|^2``.

AdamW, optional EMA of the weights, bf16 autocast on CUDA, a progress bar with the running loss,
safetensors checkpoints every ``checkpoint_every`` steps, and resume: calling :func:`train` again with
the same output directory continues from the last checkpoint (weights, EMA, optimiser, random state).
A network built here from a config is initialised from ``seed`` (the same seed gives the same weights,
bit for bit). A resumed run must keep the settings that shape the training (:data:`RESUME_FIXED`) and its
training data (images and labels, by their SHA-256) unless ``override=True``; the checkpoint records which
settings and data were used from which step on. A run whose loss or weights stop being finite (a learning rate
far too large, say) stops with a ValueError at that step; the last checkpoint, written before, is kept.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..io.progress import Progress
from ..io.runstate import array_digest
from ..ops.checks import check_cuda_inputs
from ..schedules import SCHEDULES, Schedule, get_schedule, same_schedule
from ..validation import check_memory, to_labels, to_tensor
from .checkpoint import build, load, save


@dataclass
class TrainConfig:
    """Training settings: optimiser ``steps`` of ``batch_size`` images, AdamW ``lr`` / ``weight_decay``,
    EMA decay (0 = off), the noise ``schedule`` (a name of :data:`patchmosaic.schedules.SCHEDULES`; a schedule
    object equal to one of them is stored as its name), ``t ~ U(t_min, 1)``, ``seed`` of data order and noise,
    a checkpoint every ``checkpoint_every`` steps, a loss record every ``log_every``, the torch ``device``."""

    steps: int = 10000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999      # 0 switches EMA off
    schedule: str = "cosine_legacy"
    t_min: float = 1e-3           # t ~ U(t_min, 1)
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    device: str = "cpu"

    def check(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"TrainConfig.{name} must be an integer, got {v!r}")
            setattr(self, name, int(v))  # (a numpy integer is stored as a Python int: the checkpoint is JSON)
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError(f"steps, batch_size, checkpoint_every and log_every must be positive: {self}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"TrainConfig.seed must lie in 0 .. 2^63 - 1, got {self.seed}")
        for name in ("lr", "weight_decay", "ema_decay", "t_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not np.isfinite(v):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {v!r}")
            if isinstance(v, np.generic):
                setattr(self, name, v.item())
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.ema_decay < 1 or not 0 < self.t_min < 1:
            raise ValueError(f"need lr > 0, weight_decay >= 0, 0 <= ema_decay < 1, 0 < t_min < 1: {self}")
        sched = self.schedule  # recorded by name: a Schedule object equal to a named one is stored as its name
        if isinstance(sched, Schedule) and sched.name in SCHEDULES and same_schedule(sched, SCHEDULES[sched.name]):
            self.schedule = sched.name
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must name a schedule of the package ({', '.join(SCHEDULES)}; the "
                             f"checkpoint records it by name), got {sched!r}")
        try:  # a device torch can train on here (autocast knows its type)
            torch.autocast(device_type=torch.device(self.device).type, enabled=False)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"TrainConfig.device (--device) {self.device!r} is not a device to train on, e.g. 'cpu' "
                             f"or 'cuda' ({str(e).splitlines()[0][:120]})") from None


# settings a resumed run must share with the checkpoint (the rest -- steps, checkpoint and log intervals,
# device -- may change between runs)
RESUME_FIXED = ("batch_size", "lr", "weight_decay", "ema_decay", "schedule", "t_min", "seed")


def train_bytes(config: dict, batch: int, shape) -> int:
    """Memory a training step of the network ``config`` on ``batch`` images of ``shape`` ``(C, H, W)`` needs, from
    the sizes alone: the network built on the meta device (nothing allocated), its float32 parameters five times
    (weights, gradients, AdamW's two moments, the EMA copy), and the tensors its forward pass keeps for the backward
    pass, counted through autograd's saved-tensor hooks on meta tensors, plus the batch's inputs and outputs."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.device("meta"):
        net = build(config)
        x = torch.empty((batch,) + tuple(shape))
        y = torch.zeros(batch, dtype=torch.int64) if config.get("num_classes", 0) > 0 else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(torch.empty(batch), x, y)
    params = sum(p.numel() for p in net.parameters())
    return 5 * 4 * params + saved + 4 * 4 * batch * int(np.prod(shape))


def train(net, images, labels=None, *, out: str, config: Optional[TrainConfig] = None,
          progress: bool = True, override: bool = False) -> nn.Module:
    """Train an eps network; returns the trained network (EMA weights when EMA is on), in eval mode.

    Checkpoints go to ``out``; an existing checkpoint there is resumed if its network config matches, and a
    finished one is returned as is. Resuming with other optimiser settings (:data:`RESUME_FIXED`) is refused
    unless ``override=True``; then the new settings apply from the checkpoint's step on, and the record
    (``info["train"]["history"]``) says so. A new ``seed`` reseeds the data order and noise there (the weights go on
    from the checkpoint's): every resume of that checkpoint with that seed trains the same weights, bit for bit.

    Args:
        net: a :class:`ResNet` or :class:`UNet`, or its config dict (``{"arch": "resnet", ...}``, then built
            here with weights drawn from ``config.seed``).
        images: training images ``(N, C, H, W)`` in ``[-1, 1]``, float32 or float64, numpy or torch.
        labels: ``(N,)`` integer class labels in ``[0, num_classes)``: required by a class-conditional
            network (``num_classes > 0``; a ValueError without them), ignored by an unconditional one.
            Default None.
        out: the checkpoint directory (created if missing).
        config: the :class:`TrainConfig` (steps, batch size, optimiser, EMA, schedule, seed, device, ...);
            None (default): ``TrainConfig()``. A CUDA ``config.device`` on a torch without CUDA is refused
            (RuntimeError) before any work.
        progress: a progress bar with the running loss on stderr (default True).
        override: resume even with other optimiser settings than the checkpoint's (default False).
    """
    cfg = config or TrainConfig()
    cfg.check()
    check_cuda_inputs(**{"config.device": cfg.device})
    device = torch.device(cfg.device)
    spec = net if isinstance(net, dict) else net.config  # (a dict is built only after the checks below)
    x = to_tensor(images, "images").float()
    N, C = x.shape[:2]
    if C != spec.get("channels"):
        raise ValueError(f"the network expects {spec.get('channels')} channels, images have shape {tuple(x.shape)}")
    y = None
    if spec.get("num_classes", 0) > 0:
        if labels is None:
            raise ValueError("a class-conditional network needs labels")
        y = torch.as_tensor(to_labels(labels, N), dtype=torch.int64)
        if int(y.min()) < 0 or int(y.max()) >= spec["num_classes"]:
            raise ValueError(f"labels must lie in [0, {spec['num_classes']}), got {int(y.min())}..{int(y.max())}")
    shape = tuple(x.shape[1:])
    check_memory(train_bytes(spec, cfg.batch_size, shape),  # before the network is built or anything trained
                 f"training this network ({spec}) on batches of {cfg.batch_size} images of "
                 f"{'x'.join(map(str, shape))}", advice="use a smaller batch size, width or depth")
    if isinstance(net, dict):
        with torch.random.fork_rng(devices=[]):  # the initial weights from the seed, not the global generator
            torch.manual_seed(cfg.seed)
            net = build(net)
    sched = get_schedule(cfg.schedule)
    data = array_digest(x, y)  # a resumed run must see the same images and labels

    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = copy.deepcopy(net).eval() if cfg.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(cfg.seed)
    step, losses, run_loss, elapsed = 0, [], None, 0.0
    history = [{"from_step": 0, "config": asdict(cfg), "data": data}]
    try:
        saved, info, extra = load(out, ema=False)
    except ValueError as e:
        if "no checkpoint" not in str(e):
            raise
        saved = None
    if saved is not None:
        record = info.get("train", {})
        if record.get("network") != net.config:
            raise ValueError(f"{out} holds a checkpoint of a different network; choose another output directory")
        history = record.get("history") or [{"from_step": 0, "config": record.get("config", {})}]
        used = history[-1]["config"]
        changed = {k: (used.get(k), getattr(cfg, k)) for k in RESUME_FIXED if used.get(k) != getattr(cfg, k)}
        old_data = history[-1].get("data")  # None: a checkpoint from before data digests were recorded
        other_data = old_data is not None and old_data != data
        step, losses = int(info["step"]), info.get("losses", [])
        run_loss, elapsed = _resumed_record(out, info, losses)
        if (changed or other_data) and not override:
            what = [f"{k}={new!r} (it was trained with {old!r})" for k, (old, new) in changed.items()]
            if other_data:
                what.append(f"other training data (SHA-256 of the images and labels {data[:12]}, it was trained on "
                            f"{old_data[:12]})")
            raise ValueError(f"resuming {out} at step {step} with {', '.join(what)}; pass override=True "
                             "(--override-settings) to continue with the new settings and data, or use another "
                             "directory")
        net.load_state_dict(saved.state_dict())
        _restore(net, opt, ema, gen, extra, info, device)
        if "seed" in changed:  # the data order and noise from the new seed, from this step on
            gen.manual_seed(cfg.seed)
        if changed:
            for group in opt.param_groups:
                group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
        if changed or other_data:
            history.append({"from_step": step, "config": asdict(cfg), "data": data})
    if step >= cfg.steps:
        return (ema or net).eval()

    x, y = x.to(device), None if y is None else y.to(device)
    bar = Progress(cfg.steps, "train", enabled=progress, initial=step)
    t0 = time.perf_counter() - elapsed  # (a resumed run's loss record goes on from the checkpoint's)
    while step < cfg.steps:
        idx = torch.randint(0, N, (cfg.batch_size,), generator=gen)
        t = cfg.t_min + (1 - cfg.t_min) * torch.rand(cfg.batch_size, generator=gen, dtype=torch.float64)
        eps = torch.randn((cfg.batch_size,) + tuple(x.shape[1:]), generator=gen)
        a, b2 = sched.coefficients(t.numpy())
        a = torch.as_tensor(a, dtype=torch.float32)[:, None, None, None]
        b = torch.as_tensor(np.sqrt(b2), dtype=torch.float32)[:, None, None, None]
        idx, eps = idx.to(device), eps.to(device)
        xt = a.to(device) * x[idx] + b.to(device) * eps
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = net(t.float().to(device), xt, None if y is None else y[idx])
        loss = torch.mean((pred.float() - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - cfg.ema_decay)
        step += 1
        lv = float(loss.detach())
        if not np.isfinite(lv):
            _diverged(out, step, f"the loss is {lv}", cfg)
        run_loss = lv if run_loss is None else 0.98 * run_loss + 0.02 * lv
        if step % cfg.log_every == 0 or step == cfg.steps:
            losses.append([step, round(time.perf_counter() - t0, 2), run_loss])
        bar.update(postfix=f"loss {run_loss:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            bad = [name for name, p in list(net.named_parameters()) + ([] if ema is None else [
                ("EMA " + n, p) for n, p in ema.named_parameters()]) if not bool(torch.isfinite(p).all())]
            if bad:  # never a checkpoint of NaN weights
                _diverged(out, step, f"the weights {bad[0]}{' and others' if len(bad) > 1 else ''} are not finite",
                          cfg)
            _checkpoint(out, net, opt, ema, gen, step, losses, cfg, history, run_loss,
                        time.perf_counter() - t0)
    bar.close()
    return (ema or net).eval()


def _diverged(out, step: int, what: str, cfg: TrainConfig) -> None:
    """Stop a run whose loss or weights stopped being finite, naming the step and the settings; the checkpoint
    on disk (if any) is the last good one."""
    try:
        _, info, _ = load(out, ema=False)
        kept = f"the checkpoint of step {info['step']} in {out} is kept"
    except ValueError:
        kept = "no checkpoint was written"
    raise ValueError(f"training diverged at step {step}: {what} (lr={cfg.lr:g}, weight_decay={cfg.weight_decay:g}); "
                     f"{kept}; lower the learning rate (--lr) or the weight decay")


def _resumed_record(out, info, losses):
    """The smoothed loss and the seconds of training a checkpoint records, to go on from (a checkpoint written
    before they were saved: the smoothing starts again, the time from its last logged row)."""
    run_loss = info.get("running_loss")
    if run_loss is not None and (isinstance(run_loss, bool) or not isinstance(run_loss, (int, float))
                                 or not np.isfinite(run_loss)):
        raise ValueError(f"{out}: the checkpoint's running_loss must be a finite number, got {run_loss!r}")
    elapsed = info.get("elapsed")
    if elapsed is None:
        last = losses[-1] if isinstance(losses, list) and losses and isinstance(losses[-1], list) else None
        elapsed = last[1] if last and len(last) == 3 else 0.0
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not (0 <= elapsed < float("inf")):
        raise ValueError(f"{out}: the checkpoint's elapsed seconds must be a finite number >= 0, got {elapsed!r}")
    return (None if run_loss is None else float(run_loss)), float(elapsed)


def _checkpoint(out, net, opt, ema, gen, step, losses, cfg, history, run_loss, elapsed):
    extra = {"rng": gen.get_state()}
    state = opt.state_dict()
    for i, st in state["state"].items():
        for name, v in st.items():
            extra[f"opt.{i}.{name}"] = torch.as_tensor(v)
    if ema is not None:
        extra.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    info = {"step": step, "losses": losses, "running_loss": run_loss, "elapsed": elapsed,
            "train": {"network": net.config, "config": asdict(cfg), "history": history},
            "param_groups": state["param_groups"]}
    save(out, net, extra=extra, info=info)


def _restore(net, opt, ema, gen, extra, info, device):
    state = {"state": {}, "param_groups": info["param_groups"]}
    for k, v in extra.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = v.to(device) if name != "step" else v
    opt.load_state_dict(state)
    if ema is not None:
        ema_state = {k[4:]: v for k, v in extra.items() if k.startswith("ema.")}
        if ema_state:
            ema.load_state_dict(ema_state)
        else:
            ema.load_state_dict(net.state_dict())
    gen.set_state(extra["rng"])
