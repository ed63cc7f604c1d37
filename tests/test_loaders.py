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
    with pytest.warns(UserWarning, match="training batches data_batch_3, data_batch_4, data_batch_5 are missing"):
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


# ------------------------------------------------------------------------------ issue 28: the readers' classes
def _png16(path, w, h, rows, colour_type):
    """A 16-bit PNG written by hand (Pillow writes 16-bit grey only)."""
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + r for r in rows)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_grey_pngs_keep_their_full_depth(tmp_path):
    """A full-range 16-bit gradient spans [-1, 1] (it loaded 99.6% white, clipped to 8 bits); a 16-bit and an 8-bit
    file of the same picture load alike; 16-bit colour is read to 8 bits by Pillow, scaled (not clipped)."""
    grad = (np.arange(64 * 64, dtype=np.uint32) * 16).reshape(64, 64).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(grad).save(tmp_path / "a16.png")
    Image.fromarray((grad >> 8).astype(np.uint8)).save(tmp_path / "b8.png")
    x, _ = load(str(tmp_path), size=None)
    want = torch.from_numpy(grad.astype(np.float64) / 32767.5 - 1).float()
    assert torch.allclose(x[0, 0], want, atol=1e-6) and float((x[0] > 0.99).float().mean()) < 0.01
    assert float((x[0] - x[1]).abs().max()) < 2 / 255
    rgb = tmp_path / "rgb16"
    rgb.mkdir()
    import struct
    _png16(rgb / "c.png", 2, 2, [struct.pack(">HHHHHH", 0, 65535, 32768, 65535, 0, 1000)] * 2, 2)
    c, _ = load(str(rgb), size=None)
    assert c.shape == (1, 3, 2, 2) and torch.allclose(c[0, :, 0, 0], torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)


def test_alpha_is_refused_in_every_reader_unless_dropped(tmp_path):
    """RGBA PNG folders lost alpha silently while RGBA .npz was refused; now both refuse, naming the file, and
    alpha='drop' keeps the colour channels in both."""
    rgba = _images(2, 8, 8, 4)
    for i, a in enumerate(rgba):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match=r"0\.png has an alpha channel \(mode RGBA\).*alpha='drop'"):
        load(str(tmp_path))
    x, _ = load(str(tmp_path), alpha="drop")
    assert torch.allclose(x, _ref(rgba[..., :3]), atol=1e-6)
    np.savez(tmp_path / "rgba.npz", x_train=rgba)
    with pytest.raises(ValueError, match="alpha"):
        load(str(tmp_path / "rgba.npz"))
    assert torch.equal(load(str(tmp_path / "rgba.npz"), alpha="drop")[0], x)
    for name, pic in (("la", Image.fromarray(_images(1, 8, 8, 2)[0], mode="LA")),
                      ("pal", Image.fromarray(_images(1, 8, 8)[0] % 4, mode="P"))):
        d = tmp_path / name
        d.mkdir()
        if name == "pal":
            pic.info["transparency"] = 0
        pic.save(d / "p.png")
        with pytest.raises(ValueError, match=r"p\.png has an alpha channel"):
            load(str(d))


def test_an_ambiguous_channel_axis_is_refused_unless_the_layout_is_given(tmp_path):
    """3x3 RGB pictures stored channels-last (N, 3, 3, 3) were read as channels-first; the shape cannot say, so
    the reader asks, and layout= reads either way."""
    x = _images(4, 3, 3, 3)
    np.savez(tmp_path / "d.npz", x_train=x)
    with pytest.raises(ValueError, match=r"ambiguous.*layout='NCHW' or 'NHWC'"):
        load(str(tmp_path / "d.npz"))
    last = load(str(tmp_path / "d.npz"), layout="NHWC", size=None)[0]
    first = load(str(tmp_path / "d.npz"), layout="NCHW", size=None)[0]
    assert torch.allclose(last, torch.from_numpy(x.transpose(0, 3, 1, 2) / 127.5 - 1).float(), atol=1e-6)
    assert torch.allclose(first, torch.from_numpy(x / 127.5 - 1).float(), atol=1e-6)
    assert load(str(tmp_path / "d.npz"), layout="NHWC")[0].shape == (4, 3, 32, 32)


def test_unreadable_pictures_name_their_file_and_bombs_are_refused_at_once(tmp_path):
    import struct
    import time
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    bomb = tmp_path / "bomb"
    bomb.mkdir()  # a few bytes that declare a 40000 x 40000 picture
    (bomb / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0,
                                                                                        0, 0)) + chunk(b"IEND", b""))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"big\.png: refused, the picture is too large.*MAX_IMAGE_PIXELS"):
        load(str(bomb))
    assert time.perf_counter() - t0 < 2
    good = tmp_path / "ok.png"
    Image.fromarray(_images(1, 32, 32)[0]).save(good)
    for name, data in (("trunc", good.read_bytes()[:200]), ("text", b"not a picture")):
        d = tmp_path / name
        d.mkdir()
        (d / f"{name}.png").write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name}\.png"):
            load(str(d))
    np.save(tmp_path / "one.npy", np.zeros((2, 8, 8), np.uint8))
    os.replace(tmp_path / "one.npy", tmp_path / "one.npz")
    with pytest.raises(ValueError, match=r"one\.npz is not a readable \.npz file of images: it holds a single array"):
        load(str(tmp_path / "one.npz"))


def test_limit_decodes_only_the_files_it_keeps(tmp_path, monkeypatch):
    """A folder read with limit=10 decoded every file (CelebA: about 24 GB); now only those kept, so a broken file
    past the limit is never opened."""
    from patchmosaic.data import images as readers

    for i in range(30):
        Image.fromarray(_images(1, 8, 8, seed=i)[0]).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "29.png").write_bytes(b"broken")
    calls = []
    real = readers.read_image
    monkeypatch.setattr(readers, "read_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    x, _ = load(str(tmp_path), limit=10)
    assert x.shape[0] == 10 and len(calls) == 10
    calls.clear()
    load(str(tmp_path), indices=[3, 20], limit=1)
    assert [os.path.basename(c) for c in calls] == ["03.png"]
    with pytest.raises(ValueError, match=r"29\.png"):
        load(str(tmp_path))


def test_a_tampered_cifar_batch_is_an_error_not_a_crash(tmp_path):
    """numpy's own array reconstruction, which the loader used to let the pickle call, crashed the process
    (segmentation fault) on a one-byte change of a batch; the loader now reads the arrays through stand-ins of its
    own and checks them. Run in a child process: a crash there fails the test instead of killing the suite."""
    import pickle
    import subprocess
    import sys

    good = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=2)
    cases = {"state": good.replace(b"|q\x13NNN", b"|q\x13NNb", 1),
             "shape": good.replace(b"K\x01M\x00\x0c\x86", b"K\x02M\x00\x0c\x86", 1),  # 2 x 3072 for 3072 bytes
             "dtype": good.replace(b"X\x02\x00\x00\x00u1", b"X\x02\x00\x00\x00O8", 1)}
    for name, blob in cases.items():
        assert blob != good, name
        d = tmp_path / name / "cifar-10-batches-py"
        d.mkdir(parents=True)
        (d / "data_batch_1").write_bytes(blob)
    code = ("import sys, patchmosaic as pm\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        x, y = pm.data.load(path)\n"
            "        print('loaded', tuple(x.shape))\n"
            "    except ValueError as e:\n"
            "        print('refused', e)\n")
    p = subprocess.run([sys.executable, "-c", code] + [str(tmp_path / n) for n in cases], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    lines = p.stdout.splitlines()
    assert lines[0].startswith("loaded (1, 1, 32, 32)") or lines[0].startswith("loaded (1, 3, 32, 32)"), lines
    assert "refused" in lines[1] and "an array of shape (2, 3072)" in lines[1], lines
    assert "refused" in lines[2] and "a data type 'O8'" in lines[2], lines


def test_an_idx_file_that_would_expand_past_memory_is_refused_before_it_is_read(tmp_path):
    """A small .gz whose header announces 10^11 bytes was decompressed whole before its size was looked at; now the
    header is read first and the size checked; a file with bytes past its array is refused as before."""
    import struct

    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">III", 100000, 1000, 1000) + bytes(1 << 20))
    assert bomb.stat().st_size < 1 << 16
    with pytest.raises(pm.ResourceError, match=r"an IDX array of shape \(100000, 1000, 1000\)"):
        pm.data.load(str(bomb))
    good = tmp_path / "g-images-idx3-ubyte"
    good.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 2, 3, 3) + bytes(range(18)))
    from patchmosaic.data.idx import read_idx

    assert read_idx(str(good)).tolist() == np.arange(18).reshape(2, 3, 3).tolist()
    good.write_bytes(good.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match=r"header says \[2, 3, 3\] but holds 19\+ bytes"):
        read_idx(str(good))


def test_an_npz_test_split_is_read_and_sets_without_one_say_so(tmp_path):
    xtr, xte = _images(5, 28, 28, seed=1), _images(3, 28, 28, seed=2)
    with open(tmp_path / "d.NPZ", "wb") as f:  # (np.savez would add ".npz" to the name)
        np.savez(f, x_train=xtr, y_train=np.arange(5) % 2, x_test=xte, y_test=np.array([7, 8, 9]))
    imgs, labs = load(str(tmp_path / "d.NPZ"), split="test")  # (the suffix in any case)
    assert torch.allclose(imgs, _ref(xte), atol=1e-6) and labs.tolist() == [7, 8, 9]
    assert load(str(tmp_path / "d.NPZ"))[1].tolist() == [0, 1, 0, 1, 0]
    np.savez(tmp_path / "train_only.npz", images=xtr)
    with pytest.raises(ValueError, match="train_only.npz is not a readable .npz file of images with a test split"):
        load(str(tmp_path / "train_only.npz"), split="test")
    for spec in ("default", "skimage:camera"):
        with pytest.raises(ValueError, match=f"split='test': '{spec}' has no test split"):
            load(spec, split="test")
    d = tmp_path / "pics"
    d.mkdir()
    Image.fromarray(xtr[0]).save(d / "a.png")
    with pytest.raises(ValueError, match="split='test': .*pics is a folder of images, one set; .*with the default"):
        load(str(d), split="test")
    assert load(str(d), size=8)[0].shape == (1, 1, 8, 8)  # (the advice: the folder itself, the default split)
    celeba = tmp_path / "img_align_celeba"
    celeba.mkdir()
    Image.fromarray(_images(1, 218, 178, 3)[0]).save(celeba / "000001.png")
    with pytest.raises(ValueError, match="split='test': .*img_align_celeba is a folder of images"):
        load(str(tmp_path / "img_align_celeba"), split="test")


def test_folders_mixing_files_and_classes_empty_classes_and_hidden_folders(tmp_path):
    pics = _images(4, 8, 8)
    root = tmp_path / "r"
    for sub in ("cat", "dog", ".ipynb_checkpoints"):
        (root / sub).mkdir(parents=True)
    for i, sub in enumerate(("cat", "dog", ".ipynb_checkpoints")):
        Image.fromarray(pics[i]).save(root / sub / f"{i}.png")
    _, labs = load(str(root), size=8)
    assert labs.tolist() == [0, 1]  # the hidden folder is no class, and its copy no image
    (root / "aaa_empty").mkdir()
    with pytest.raises(ValueError, match="class folder .*aaa_empty holds no images.*an empty class"):
        load(str(root), size=8)
    (root / "aaa_empty").rmdir()
    Image.fromarray(pics[3]).save(root / "top.png")
    with pytest.raises(ValueError, match="holds both image files \\(top.png, ...\\) and class sub-folders \\(cat, dog\\)"):
        load(str(root), size=8)


def test_a_jpeg_is_read_as_its_exif_orientation_shows_it(tmp_path):
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :10] = 255  # the left half white as stored
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    im.save(tmp_path / "p.png", exif=exif.tobytes())
    shown = np.asarray(Image.open(tmp_path / "p.png").transpose(Image.Transpose.ROTATE_270))  # 20 x 10, upright
    from patchmosaic.data.images import read_image

    got = read_image(str(tmp_path / "p.png"))
    assert got.shape == (20, 10, 3) and np.array_equal(got, shown)


def test_npz_sizes_are_checked_before_reading_and_object_arrays_never_written(tmp_path, monkeypatch):
    from patchmosaic.io.files import write_npz
    from patchmosaic.validation import ResourceError

    np.savez(tmp_path / "big.npz", images=_images(50, 28, 28))
    monkeypatch.setattr("patchmosaic.validation.available_memory", lambda: 1000)
    with pytest.raises(ResourceError, match="reading .*big.npz needs about"):
        load(str(tmp_path / "big.npz"))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="array 'a' holds Python objects"):
        write_npz(str(tmp_path / "o.npz"), a=np.array([{"x": 1}], dtype=object))
    assert not os.path.exists(tmp_path / "o.npz")
    from patchmosaic.machines.pspc import Heatmaps

    (tmp_path / "h.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="h.npz is not a heatmap file"):
        Heatmaps.load(str(tmp_path / "h.npz"))
