"""A machine's source: the training images, optionally with their left-right mirrors (``xflip=True``), for every
machine: the same results as the machine built on the images and their mirrors given explicitly, labels doubled,
provenance mapped back (``source_image``), the description (resume fingerprints) telling the two apart."""

import numpy as np
import pytest
import torch

import patchmosaic as pm

RNG = np.random.default_rng(0)
IMGS = RNG.uniform(-1, 1, (6, 1, 8, 8))
LABELS = np.array([0, 1, 0, 1, 2, 2])
BOTH = np.concatenate([IMGS, IMGS[..., ::-1]])
X = RNG.standard_normal((2, 1, 8, 8))

MACHINES = {"IS": (pm.IS, {}), "LS": (pm.LS, {"k": 3}), "ELS": (pm.ELS, {"k": 3}), "DataLocal": (pm.DataLocal, {"k": 3}),
            "PCALocality": (pm.PCALocality, {}), "SmoothedCFDM": (pm.SmoothedCFDM, {}), "Wiener": (pm.Wiener, {}),
            "PSPC": (pm.PSPC, {"k": 4})}


@pytest.mark.parametrize("name", list(MACHINES))
def test_xflip_is_the_machine_on_images_and_mirrors(name):
    cls, call = MACHINES[name]
    flipped = cls(IMGS, LABELS, xflip=True)
    explicit = cls(np.ascontiguousarray(BOTH), np.concatenate([LABELS, LABELS]))
    assert flipped.N == 12 and np.array_equal(flipped.labels, np.concatenate([LABELS, LABELS]))
    labels = None if name == "Wiener" else [0, 2]
    assert np.array_equal(flipped.denoise(X, 0.4, labels=labels, **call), explicit.denoise(X, 0.4, labels=labels, **call))
    assert flipped.describe()["xflip"] is True and "xflip" not in cls(IMGS, LABELS).describe()


def test_provenance_maps_back_to_the_training_image():
    m = pm.ELS(IMGS, xflip=True)
    x0, prov = m.denoise(0.9 * IMGS[:1, :, :, ::-1].copy(), 0.02, 3, return_provenance=True)
    image, mirrored = m.source_image(prov.image)
    assert bool(mirrored.all()) and np.all(image == 0)  # a mirrored query is stitched from image 0's mirror
    with pytest.raises(TypeError, match="xflip must be True or False"):
        pm.LS(IMGS, xflip=1)
