"""Training recipes by name (``presets.json`` beside this file): ``patchmosaic train --preset NAME``.

A preset names its data (a data spec of :func:`patchmosaic.data.load` and how many of its first images), the
network (``arch`` and its constructor arguments; the image channels and classes come from the data) and the
training settings (:class:`TrainConfig` fields). :func:`recipe` returns one with overrides applied and says
which values changed; :func:`network_config` and :func:`train_config` turn it into what :func:`train` takes.

``load_network("preset:NAME")`` opens a preset's trained network where one ships with the package (``trained/NAME/``);
none does at present, so it says how to train one: ``patchmosaic train --preset NAME --out DIR``, then use ``DIR``.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS_FILE = os.path.join(HERE, "presets.json")
TRAINED = os.path.join(HERE, "trained")
PREFIX = "preset:"

# override keys: where each lives in a preset
DATA_KEYS = ("data", "limit", "conditional")
NETWORK_KEYS = ("arch", "width", "depth", "widths", "attention", "padding", "embed_at")
TRAIN_KEYS = ("steps", "batch_size", "lr", "weight_decay", "ema_decay", "seed")
ARCH_KEYS = {"resnet": ("width", "depth", "padding"), "unet": ("widths", "attention", "padding", "embed_at")}
ARCH_DEFAULTS = {"resnet": {"width": 128, "depth": 6, "padding": "zeros"},
                 "unet": {"widths": [64, 128, 256], "attention": False, "padding": "zeros"}}

_cache: Dict[str, dict] = {}


def presets() -> Dict[str, dict]:
    """Every preset by name, as stored (a deep copy)."""
    if not _cache:
        with open(PRESETS_FILE, encoding="utf-8") as f:
            _cache.update(json.load(f)["presets"])
    return copy.deepcopy(_cache)


def names() -> List[str]:
    return list(presets())


def get(name: str) -> dict:
    """The preset ``name``; a ValueError listing the known ones otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a preset is named by a string, got {type(name).__name__}")
    all_ = presets()
    if name not in all_:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(all_)} (patchmosaic train --list-presets)")
    return all_[name]


def recipe(name: str, overrides: Optional[dict] = None) -> Tuple[dict, List[Tuple[str, object, object]]]:
    """``(preset with overrides applied, [(key, preset value, new value), ...] for each value that changed)``.

    ``overrides`` maps keys of :data:`DATA_KEYS`, :data:`NETWORK_KEYS` and :data:`TRAIN_KEYS` to values (None:
    keep the preset's). Another ``arch`` starts that architecture from its defaults (:data:`ARCH_DEFAULTS`).
    """
    r = get(name)
    changed = []
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(over) - set(DATA_KEYS + NETWORK_KEYS + TRAIN_KEYS))
    if unknown:
        raise ValueError(f"preset {name}: unknown setting(s) {', '.join(unknown)}; settable: "
                         f"{', '.join(DATA_KEYS + NETWORK_KEYS + TRAIN_KEYS)}")
    arch = over.get("arch", r["network"]["arch"])
    if arch not in ARCH_KEYS:
        raise ValueError(f"preset {name}: arch must be one of {sorted(ARCH_KEYS)}, got {arch!r}")
    if arch != r["network"]["arch"]:
        changed.append(("arch", r["network"]["arch"], arch))
        r["network"] = dict(arch=arch, **ARCH_DEFAULTS[arch])
    for key, value in over.items():
        if key == "arch":
            continue
        if key in NETWORK_KEYS and key not in ARCH_KEYS[arch]:
            raise ValueError(f"preset {name}: {key} is not a setting of a {arch} (its settings: "
                             f"{', '.join(ARCH_KEYS[arch])})")
        where = r if key in DATA_KEYS else r["network"] if key in NETWORK_KEYS else r["train"]
        old = where.get(key)
        if key == "widths":
            value = [int(w) for w in value]
        if old != value:
            changed.append((key, old, value))
            where[key] = value
    return r, changed


def network_config(r: dict, channels: int, num_classes: int) -> dict:
    """The :func:`build` config of recipe ``r`` for data of ``channels`` channels and ``num_classes`` classes
    (used only when the recipe is conditional)."""
    cfg = dict(r["network"])
    cfg.update(channels=int(channels), num_classes=int(num_classes) if r["conditional"] else 0)
    return cfg


def train_config(r: dict, **kw):
    """The :class:`TrainConfig` of recipe ``r``; ``kw`` sets the fields a preset leaves open (device,
    checkpoint_every, log_every)."""
    from .train import TrainConfig

    return TrainConfig(**r["train"], **kw)


def trained_path(name: str) -> Optional[str]:
    """The folder of the trained network of preset ``name`` shipped with the package, or None."""
    path = os.path.join(TRAINED, name)
    return path if os.path.exists(os.path.join(path, "model.safetensors")) else None


def resolve_network_path(path: str) -> str:
    """``preset:NAME`` -> the folder of its shipped network (a ValueError saying how to train it where none
    ships); any other path unchanged."""
    if not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX):]
    get(name)
    found = trained_path(name)
    if found is None:
        shipped = [n for n in names() if trained_path(n)]
        raise ValueError(f"no trained network of preset {name} ships with the package (shipped: "
                         f"{', '.join(shipped) or 'none'}); train it with patchmosaic train --preset {name} --out DIR "
                         "and use DIR")
    return found
