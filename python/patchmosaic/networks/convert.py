"""TorchScript eps networks (such as the reference networks in ``shared/models``) as this package's checkpoints.

The reference networks were scripted from the same two families as :class:`ResNet` and :class:`UNet` (their
UNets add the embedding at each block's input: ``embed_at="input"``), so their weights map one to one onto a
network built here. :func:`torchscript_config` reads the config from the module (parameter shapes, padding,
classes, attention); :func:`convert` builds that network, loads the weights, checks that both give the same eps
on a few seeded inputs, and writes the safetensors checkpoint (plus ``config.json``) that :func:`load_network`
opens without TorchScript.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import torch

from .checkpoint import build, load, save

# largest |eps difference| accepted, relative to max |eps| (float32 rounding of the same arithmetic)
TOLERANCE = 1e-4


def load_torchscript(path: str, device="cpu"):
    """``torch.jit.load`` without its deprecation warning (loading stays supported here), errors in one line."""
    if not os.path.isfile(path):
        raise ValueError(f"no TorchScript file at {path}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=DeprecationWarning)
            return torch.jit.load(path, map_location=device).eval()
    except RuntimeError as e:
        raise ValueError(f"{path} is neither a patchmosaic checkpoint nor a TorchScript module: "
                         f"{str(e).splitlines()[0]}") from None


def torchscript_config(module, name: str = "the module") -> dict:
    """The :func:`build` config of a TorchScript ResNet or UNet of this package's families; a ValueError naming
    what does not fit otherwise."""
    state = module.state_dict()
    mods = dict(module.named_modules())
    embed = mods.get("embed")
    classes = getattr(embed, "num_classes", None)
    if "embed.mlp.0.weight" not in state or not isinstance(classes, int):
        raise ValueError(f"{name} is not a ResNet or UNet of patchmosaic's families (it has no time embedding "
                         "embed.mlp with num_classes)")
    emb_dim = int(state["embed.mlp.0.weight"].shape[0])
    if "conv_in.weight" in state:
        w = state["conv_in.weight"]
        depth = sum(1 for k in state if k.startswith("convs.") and k.endswith(".weight"))
        width = int(w.shape[0])
        return dict(arch="resnet", channels=int(w.shape[1]), width=width, depth=depth,
                    padding=mods["conv_in"].padding_mode, num_classes=max(classes, 0),
                    emb_dim=None if emb_dim == width else emb_dim)
    if "downs.0.conv1.weight" in state and "mid.conv1.weight" in state:
        n = sum(1 for k in state if k.startswith("downs.") and k.endswith(".conv1.weight"))
        widths = [int(state[f"downs.{i}.conv1.weight"].shape[0]) for i in range(n)]
        widths.append(int(state["mid.conv1.weight"].shape[0]))
        cin = int(state["downs.0.conv1.weight"].shape[1])
        # the first up block takes 2 o channels and gives o: its embedding has 2 o rows at the input, o after conv1
        first_up_in = int(state["outs.0.conv1.weight"].shape[1])
        attention = "attn.norm.weight" in state
        cfg = dict(arch="unet", channels=cin, widths=widths, padding=mods["downs.0.conv1"].padding_mode,
                   num_classes=max(classes, 0), attention=attention,
                   heads=int(mods["attn.attn"].num_heads) if attention else 4,
                   emb_dim=None if emb_dim == widths[-1] else emb_dim)
        if int(state["outs.0.proj.weight"].shape[0]) == first_up_in:
            cfg["embed_at"] = "input"
        return cfg
    raise ValueError(f"{name} is not a ResNet or UNet of patchmosaic's families (no conv_in or downs/mid blocks)")


def convert(source: str, out: str, *, check_inputs: int = 4) -> dict:
    """Convert the TorchScript network ``source`` into a checkpoint in ``out`` (a directory or ``.safetensors``).

    The converted network is checked against the TorchScript one on ``check_inputs`` seeded noisy inputs at
    several times (and labels, when conditional): their eps must agree to :data:`TOLERANCE` of max |eps| (float32
    rounding), else a ValueError and nothing is written. Returns the info stored with it (source file, its
    SHA-256, the config, the largest difference found).
    """
    scripted = load_torchscript(source)
    config = torchscript_config(scripted, source)
    net = build(config)
    state = scripted.state_dict()
    if config["num_classes"] == 0:  # an unconditional reference network keeps an unused 1-row class table
        state.pop("embed.classes.weight", None)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{source}: its weights do not fit the {config['arch']} {config}: "
                         f"{str(e).splitlines()[-1].strip()[:200]}") from None
    net.eval()
    diff, scale = _largest_difference(scripted, net, config, check_inputs)
    if not diff <= TOLERANCE * max(scale, 1.0):
        raise ValueError(f"{source}: the converted {config['arch']} does not compute what the TorchScript module "
                         f"does (eps differs by {diff:.3g}, max |eps| {scale:.3g}); not converted")
    info = {"converted_from": os.path.abspath(source), "sha256": _sha256(source), "config": config,
            "check": {"inputs": check_inputs, "max_abs_eps_difference": diff, "max_abs_eps": scale}}
    save(out, net, info=info)
    return info


def _largest_difference(scripted, net, config: dict, n: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, config["channels"], 32, 32, generator=gen)
    t = torch.linspace(0.02, 1.0, n)
    y = torch.arange(n) % config["num_classes"] if config["num_classes"] else None
    with torch.no_grad():
        a, b = scripted(t, x, y), net(t, x, y)
    return float((a - b).abs().max()), float(a.abs().max())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def converted(source: str, cache: str) -> torch.nn.Module:
    """The converted copy of ``source`` kept under the folder ``cache`` (converted on first use, reused while the
    source's SHA-256 is the same); loads with :func:`load`."""
    out = os.path.join(cache, _sha256(source)[:16])
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        convert(source, out)
    return load(out)[0]
