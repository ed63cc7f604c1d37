"""How long training will take here: a few timed optimiser steps of the network on random data, scaled.

:func:`step_seconds` times the work of one training step (forward, loss, backward, AdamW, EMA update; bf16
autocast on CUDA, as :func:`train` does) on a probe batch and scales it to the full batch linearly (on a CPU
the cost of a convolution grows with the batch; on a GPU the full batch is timed). :func:`estimate_text` says it
in words.
"""

from __future__ import annotations

import time

import torch

from ..ops.checks import check_cuda_inputs
from .checkpoint import build

CPU_PROBE_BATCH = 8  # images per timed step on a CPU


def step_seconds(config: dict, batch_size: int, *, device="cpu", steps: int = 2, probe_batch=None) -> dict:
    """Seconds per training step of the network ``config`` at ``batch_size`` on ``device``.

    Returns ``{"seconds_per_step", "probe_batch", "timed_steps", "device", "threads"}``: one untimed warm-up step,
    then ``steps`` timed ones of ``probe_batch`` images (default: :data:`CPU_PROBE_BATCH` on a CPU, the full
    batch on a GPU), scaled by ``batch_size / probe_batch``.
    """
    check_cuda_inputs(device=device)
    dev = torch.device(device)
    probe = probe_batch or (min(batch_size, CPU_PROBE_BATCH) if dev.type == "cpu" else batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build(config).to(dev).train()
        ema = [p.detach().clone() for p in net.parameters()]
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(probe, config["channels"], 32, 32, device=dev)
        t = torch.rand(probe, device=dev)
        y = torch.randint(0, config["num_classes"], (probe,), device=dev) if config.get("num_classes") else None

        def one():
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                pred = net(t, x, y)
            loss = torch.mean((pred.float() - x) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for pe, p in zip(ema, net.parameters()):
                    pe.lerp_(p, 1e-3)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        one()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        per = (time.perf_counter() - t0) / steps
    return {"seconds_per_step": per * batch_size / probe, "probe_batch": probe, "timed_steps": steps,
            "device": str(dev), "threads": torch.get_num_threads()}


def duration(seconds: float) -> str:
    """``seconds`` in words: ``45 s``, ``12 min``, ``3.5 h``, ``4.2 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def estimate_text(timing: dict, steps: int, done: int = 0) -> str:
    """One line: the measured time per step and the time for the steps still to do."""
    dev = timing["device"]
    where = f"CPU, {timing['threads']} threads" if dev == "cpu" else f"GPU {dev}"
    left = max(steps - done, 0)
    resumed = f" (resuming at step {done})" if done else ""
    return (f"{timing['seconds_per_step']:.3g} s per step on this machine ({where}; {timing['timed_steps']} timed "
            f"steps of {timing['probe_batch']} images, scaled to the batch): {left} steps{resumed} take about "
            f"{duration(left * timing['seconds_per_step'])}")
