"""Every loader on files written here in their native formats; subsets; errors that say what to do."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

import patchmosaic as pm
from patchmosaic.data import load

Image = pytest.importorskip("PIL.Image")  # in the test extra


def _images(n, h, w, c=None, seed=0):
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def _ref(u8):
    """The paper's preprocessing, written out: x / 127.5 - 1, then bilinear antialiased resize to 32."""
    x = torch.from_numpy(u8.astype(np.float32) / 127.5 - 1)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-1] != 32:
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False,
                                            antialias=True).clamp(-1, 1)
    return x


def test_idx_folder_and_named_root(tmp_path):
    x, y = _images(12, 28, 28), np.arange(12, dtype=np.uint8) % 3
    d = tmp_path / "mnist"
    d.mkdir()
    _write_idx(d / "train-images-idx3-ubyte.gz", x)
    _write_idx(d / "train-labels-idx1-ubyte.gz", y)
    for spec, kw in ((str(d), {}), ("mnist", {"root": str(tmp_path)}), (str(d / "train-images-idx3-ubyte.gz"), {})):
        imgs, labs = load(spec, **kw)
        assert imgs.shape == (12, 1, 32, 32) and torch.allclose(imgs, _ref(x), atol=1e-6)
        assert labs.tolist() == y.tolist()


def test_cifar_python_batches_without_executing_code(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    x = _images(6, 32, 32, 3)
    for i, part in enumerate((x[:4], x[4:]), 1):
        flat = part.transpose(0, 3, 1, 2).reshape(len(part), -1)   # CIFAR stores R plane, G plane, B plane
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": flat, b"labels": list(range(len(part)))}, f, protocol=2)
    imgs, labs = load(str(tmp_path))
    assert torch.allclose(imgs, _ref(x), atol=1e-6) and labs.tolist() == [0, 1, 2, 3, 0, 1]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        load(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_celeba_folder_is_centre_cropped(tmp_path):
    d = tmp_path / "img_align_celeba"
    d.mkdir()
    faces = _images(3, 218, 178, 3)
    for i, f in enumerate(faces):
        Image.fromarray(f).save(d / f"{i + 1:06d}.png")
    imgs, _ = load(str(tmp_path))
    assert torch.allclose(imgs, _ref(faces[:, 40:188, 15:163]), atol=1e-6)


def test_image_folder_with_classes(tmp_path):
    for c, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(_images(1, 40, 50, seed=10 * c + i)[0]).save(tmp_path / name / f"{i}.png")
    imgs, labs = load(str(tmp_path), size=16)
    assert imgs.shape == (4, 1, 16, 16) and labs.tolist() == [0, 0, 1, 1]
    # a centre square of a 40x50 picture is columns 5..44
    one = np.asarray(Image.open(tmp_path / "cats" / "0.png"))[:, 5:45]
    ref = torch.nn.functional.interpolate(torch.from_numpy(one.astype(np.float32) / 127.5 - 1)[None, None],
                                          size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(imgs[0], ref[0].clamp(-1, 1), atol=1e-6)


def test_npz_subsets_by_index_and_class(tmp_path):
    x, y = _images(20, 32, 32, 3), np.arange(20) % 4
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    imgs, labs = load(str(tmp_path / "d.npz"), indices=[3, 7, 8, 9], classes=[3, 0], limit=2)
    assert labs.tolist() == [3, 3] and torch.allclose(imgs, _ref(x[[3, 7]]), atol=1e-6)
    with pytest.raises(ValueError, match="class 5 has no images"):
        load(str(tmp_path / "d.npz"), classes=[5])
    with pytest.raises(ValueError, match="indices"):
        load(str(tmp_path / "d.npz"), indices=[25])


def test_photographs_and_crops():
    pytest.importorskip("skimage")
    img, lab = load("skimage:brick")
    assert img.shape == (1, 1, 512, 512) and float(img.min()) >= -1 and float(img.max()) <= 1
    tiles, _ = load("skimage:astronaut", crop=64, stride=128)
    assert tiles.shape == (16, 3, 64, 64)
    assert torch.equal(tiles[1], load("skimage:astronaut")[0][0, :, 0:64, 128:192])
    with pytest.raises(ValueError, match="unknown skimage.data photograph"):
        load("skimage:nothing")


def test_errors_say_where_to_put_files(tmp_path):
    with pytest.raises(ValueError, match=r"cifar10 is not at .*cifar-10-batches-py"):
        load("cifar10", root=str(tmp_path))
    with pytest.raises(ValueError, match="no data set at"):
        load(str(tmp_path / "nothing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"PK junk")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        (tmp_path / "x-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03")
        load(str(tmp_path / "x-images-idx3-ubyte"))


def test_default_set_through_load():
    x, y = load("default", classes=[7])
    assert x.shape == (200, 1, 32, 32) and set(y.tolist()) == {7}
    assert torch.equal(x, pm.data.load_default()[0][pm.data.load_default()[1] == 7])


def test_download_without_torchvision_says_where_to_put_files(tmp_path):
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed: a download would be attempted")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match=r"needs torchvision; or put the four MNIST IDX files"):
        load("mnist", root=str(tmp_path), download=True)
