"""Image-folder / zip loading: the same data from a folder and a zip, seeded shots, subsets, RGB conversion,
and every bad-data case failing with a message that names the file or folder at fault."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from image_helpers import write_images, zip_tree
from verakit.train.classify.data import DataError
from verakit.train.vision.images import ImageDataError, class_counts, image_fingerprint, load_images


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images") / "data", n_train=8, n_test=4)


def _tail(path: str) -> str:
    """split/class/file of a folder path or of a zip member ("data.zip:top/train/red/01.png")."""
    return "/".join(path.replace(":", "/").split("/")[-3:])


def _same(a, b) -> None:
    assert a.classes == b.classes
    for sa, sb in ((a.train, b.train), (a.test, b.test)):
        assert sa.name == sb.name and sa.labels == sb.labels
        assert [_tail(p) for p in sa.paths] == [_tail(p) for p in sb.paths]
        assert all(np.array_equal(x, y) for x, y in zip(sa.images, sb.images, strict=True))


@pytest.mark.parametrize("prefix, folders", [("", False), ("cifar/", True)])
def test_zip_and_folder_give_the_same_data(tree, tmp_path, prefix, folders):
    archive = zip_tree(tree, tmp_path / "data.zip", prefix=prefix, folders=folders)
    from_dir, from_zip = load_images(tree), load_images(archive)
    _same(from_dir, from_zip)
    assert from_dir.classes == ("blue", "green", "red")
    assert class_counts(from_dir) == {"train": dict.fromkeys(from_dir.classes, 8),
                                      "test": dict.fromkeys(from_dir.classes, 4)}
    assert from_zip.train.paths[0] == f"{archive}:{prefix}train/blue/00.png"
    assert from_dir.train.paths[0] == str(tree / "train" / "blue" / "00.png")
    from PIL import Image

    first = from_dir.train.images[0]
    assert first.dtype == np.uint8 and first.shape == (16, 16, 3)
    assert np.array_equal(first, np.asarray(Image.open(tree / "train" / "blue" / "00.png")))
    _same(load_images(tree, shots=3, seed=4), load_images(archive, shots=3, seed=4))


def test_shots_are_seeded_per_class(tree):
    a, b, c = load_images(tree, shots=3, seed=0), load_images(tree, shots=3, seed=0), load_images(tree, shots=3, seed=1)
    assert a.train.paths == b.train.paths
    assert a.train.paths != c.train.paths
    assert class_counts(a)["train"] == {"blue": 3, "green": 3, "red": 3}
    assert len(a.test) == 12  # shots never touch the evaluation split
    # golden: random.Random("verakit:shots:0:blue").sample(8 sorted names, 3), sorted
    assert [Path(p).name for p in a.train.paths[:3]] == ["01.jpg", "03.jpg", "06.png"]


def test_subsets_and_eval_only(tree):
    d = load_images(tree, max_train_samples=5, max_eval_samples=7, seed=2)
    assert len(d.train) == 5 and len(d.test) == 7
    assert set(d.test.paths) <= set(load_images(tree).test.paths)
    e = load_images(tree, max_eval_samples=7, seed=2, decode_train=False)
    assert len(e.train) == 0 and e.test.paths == d.test.paths


def test_grey_and_rgba_images_become_rgb(tmp_path):
    from PIL import Image

    root = write_images(tmp_path / "d", n_train=2, n_test=1)
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey, mode="L").save(root / "train" / "red" / "grey.png")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 100, 255
    Image.fromarray(rgba, mode="RGBA").save(root / "train" / "red" / "alpha.png")
    (root / "train" / "red" / ".DS_Store").write_bytes(b"\0junk")  # hidden files are skipped
    d = load_images(root)
    by_name = {Path(p).name: x for p, x in zip(d.train.paths, d.train.images, strict=True)}
    assert np.array_equal(by_name["grey.png"], np.stack([grey] * 3, axis=-1))
    assert by_name["alpha.png"].shape == (16, 16, 3) and (by_name["alpha.png"][..., 0] == 100).all()
    assert ".DS_Store" not in by_name


def _bad(tmp_path: Path, case: str) -> tuple[Path, str, dict]:
    """(source, text that must be in the message, load_images kwargs) for one bad-data case."""
    root = write_images(tmp_path / "d", n_train=2, n_test=1)
    kw: dict = {}
    if case == "empty class":
        shutil.rmtree(root / "train" / "green")
        (root / "train" / "green").mkdir()
        return root, f"{root / 'train' / 'green'}: empty class folder", kw
    if case == "unreadable image":
        (root / "test" / "red" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        return root, f"{root / 'test' / 'red' / 'bad.jpg'}: unreadable image", kw
    if case == "truncated image":
        good = (root / "train" / "blue" / "01.jpg").read_bytes()
        (root / "train" / "blue" / "01.jpg").write_bytes(good[: len(good) // 2])
        return root, f"{root / 'train' / 'blue' / '01.jpg'}: unreadable image", kw
    if case == "class sets differ":
        shutil.move(root / "test" / "red", root / "test" / "pink")
        return root, "class folders differ between train/ and test/: only in train/: ['red']; only in test/: ['pink']", kw
    if case == "file outside class folder":
        shutil.copy(root / "train" / "red" / "00.png", root / "train" / "stray.png")
        return root, f"{root / 'train' / 'stray.png'}: file outside a class folder", kw
    if case == "not an image":
        (root / "train" / "red" / "notes.txt").write_text("hello")
        return root, f"{root / 'train' / 'red' / 'notes.txt'}: not an image file", kw
    if case == "no test split":
        shutil.rmtree(root / "test")
        return root, f"{root / 'test'}: no evaluation split", kw
    if case == "no train split":
        shutil.rmtree(root / "train")
        return root, f"{root / 'train'}: no train/ folder", kw
    if case == "too few for shots":
        kw["shots"] = 3
        return root, f"{root / 'train' / 'blue'}: 3 shots per class asked, but the class has only 2 images", kw
    if case == "one class":
        for split in ("train", "test"):
            shutil.rmtree(root / split / "green")
            shutil.rmtree(root / split / "red")
        return root, f"{root / 'train'}: 1 class folder(s)", kw
    if case == "missing source":
        return tmp_path / "nope", f"{tmp_path / 'nope'}: no such image folder or zip file", kw
    if case == "not a zip":
        (tmp_path / "data.zip").write_text("plain text")
        return tmp_path / "data.zip", f"{tmp_path / 'data.zip'}: not a folder or a readable zip file", kw
    raise AssertionError(case)


BAD = ["empty class", "unreadable image", "truncated image", "class sets differ", "file outside class folder",
       "not an image", "no test split", "no train split", "too few for shots", "one class", "missing source",
       "not a zip"]


@pytest.mark.parametrize("case", BAD)
def test_bad_folder_names_the_culprit(tmp_path, case):
    source, message, kw = _bad(tmp_path, case)
    with pytest.raises(ImageDataError) as info:
        load_images(source, **kw)
    assert message in str(info.value)
    assert isinstance(info.value, DataError)  # the CLI reports DataErrors as clean errors (exit 2)


@pytest.mark.parametrize("case", ["empty class", "unreadable image", "class sets differ"])
def test_bad_zip_names_the_member(tmp_path, case):
    root, _, kw = _bad(tmp_path, case)
    archive = zip_tree(root, tmp_path / "data.zip", folders=True)  # an empty class exists only as "train/green/"
    member = {"empty class": "train/green", "unreadable image": "test/red/bad.jpg", "class sets differ": ""}[case]
    with pytest.raises(ImageDataError) as info:
        load_images(archive, **kw)
    assert (f"{archive}:{member}" if member else f"{archive}: class folders differ") in str(info.value)


def test_macos_zip_junk_is_ignored(tree, tmp_path):
    archive = zip_tree(tree, tmp_path / "data.zip")
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("__MACOSX/train/red/._00.png", b"\0resource fork")
    _same(load_images(archive), load_images(tree))


def test_image_fingerprint_follows_pixels_and_labels_not_paths(tmp_path):
    from PIL import Image

    tree = write_images(tmp_path / "a", n_train=2, n_test=1)
    fp = image_fingerprint(load_images(tree))
    moved = shutil.copytree(tree, tmp_path / "elsewhere")
    assert image_fingerprint(load_images(zip_tree(tree, tmp_path / "a.zip"))) == fp  # a zip of the same files
    assert image_fingerprint(load_images(moved)) == fp  # the same images in another folder
    # one pixel of one training image changed: other data
    path = moved / "train" / "red" / "00.png"  # PNG: lossless, the change survives the round trip
    pixels = np.asarray(Image.open(path).convert("RGB")).copy()
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(path)
    assert image_fingerprint(load_images(moved)) != fp
    # the same pixels under another class (labels are part of the data)
    relabelled = shutil.copytree(tree, tmp_path / "relabelled")
    shutil.move(relabelled / "train" / "red" / "00.png", relabelled / "train" / "blue" / "99.png")
    assert image_fingerprint(load_images(relabelled)) != fp
    # a subset (--max-train-samples) is other data too
    assert image_fingerprint(load_images(tree, max_train_samples=3)) != fp
