"""Image-classification data from an image-folder layout, on disk or in a zip file.

The layout (the one torchvision's ImageFolder reads, without needing torchvision):

    ROOT/train/<class>/*.jpg      training images; one folder per class (subfolders count for the class)
    ROOT/test/<class>/*.jpg       evaluation images, the same class folders (``val/``, ``validation/``
                                  or ``dev/`` are accepted when there is no ``test/``)

ROOT is a folder or a ``.zip`` of that layout (at the top of the archive, or under one top folder).
Class ids are the class folder names in sorted order. Images are decoded with Pillow and converted to
RGB (greyscale and RGBA files are fine). Every file in a class folder must be an image: hidden files,
``__MACOSX/`` and ``Thumbs.db`` / ``desktop.ini`` are skipped, anything else is an error.

``load_images`` checks the whole layout (both splits, every class) before decoding, then decodes only
the images it keeps (``shots`` per class, ``max_*_samples``), each one fully, so that an unreadable file
fails here, naming it, and never in the middle of training. Every bad-data case raises ImageDataError,
whose message starts with the path at fault (``archive.zip:train/cat/3.jpg`` inside a zip).
"""

from __future__ import annotations

import io
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS", "EVAL_SPLITS", "ImageDataError", "ImageSplit", "ImageData", "load_images", "class_counts", "image_fingerprint",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
EVAL_SPLITS = ("test", "val", "validation", "dev")  # the first one present is the evaluation split
_SKIPPED_NAMES = {"thumbs.db", "desktop.ini"}


class ImageDataError(DataError):
    """A missing or malformed image folder/zip; the message starts with the file or folder at fault."""


@dataclass(frozen=True)
class ImageSplit:
    name: str  # folder name: "train", or the evaluation split's ("test", "val", ...)
    images: tuple[np.ndarray, ...]  # each (H, W, 3) uint8 RGB, fully decoded
    labels: tuple[int, ...]  # class ids, index into ImageData.classes
    paths: tuple[str, ...]  # where each image came from, as error messages name it

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ImageData:
    source: str  # the folder or zip file given
    classes: tuple[str, ...]  # class folder names, sorted; index = class id
    train: ImageSplit
    test: ImageSplit  # the evaluation split (test/ or its fallback)


class _Tree:
    """File names (relative POSIX paths under ROOT) of a folder or zip, and how to read and name them."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if source.is_dir():
            self.files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        elif source.is_file():
            try:
                self._zip = zipfile.ZipFile(source)
            except (zipfile.BadZipFile, OSError) as e:
                raise ImageDataError(f"{source}: not a folder or a readable zip file ({e})") from None
            names = sorted(n for n in self._zip.namelist() if not n.endswith("/"))
            self._prefix = _zip_root(names)
            self.files = [n[len(self._prefix):] for n in names if n.startswith(self._prefix)]
        else:
            raise ImageDataError(f"{source}: no such image folder or zip file")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def where(self, rel: str) -> str:
        if self._zip is not None:
            return f"{self.source}:{self._prefix}{rel}"
        return str(self.source / rel)

    def read(self, rel: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self._prefix + rel)
        return (self.source / rel).read_bytes()

    def subdirs(self, split: str) -> set[str]:
        """Class folder names under `split`/, including empty ones (they exist as folders only)."""
        if self._zip is not None:
            names = [n[len(self._prefix):] for n in self._zip.namelist() if n.startswith(self._prefix)]
            out = set()
            for n in names:  # a class folder is a "split/class/" entry or the parent folder of a file in it
                parts = PurePosixPath(n).parts
                if parts[:1] == (split,) and (len(parts) > 2 or (len(parts) == 2 and n.endswith("/"))):
                    out.add(parts[1])
            return {c for c in out if not _skipped(c)}
        folder = self.source / split
        return {p.name for p in folder.iterdir() if p.is_dir() and not _skipped(p.name)} if folder.is_dir() else set()


def _zip_root(names: list[str]) -> str:
    """"" when train/ is at the top of the archive, "top/" when it is under one top folder."""
    if any(n.startswith("train/") for n in names):
        return ""
    tops = {n.split("/", 1)[0] for n in names if "/" in n and not n.startswith("__MACOSX/")}
    if len(tops) == 1:
        top = tops.pop()
        if any(n.startswith(f"{top}/train/") for n in names):
            return f"{top}/"
    return ""


def _skipped(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX" or part.lower() in _SKIPPED_NAMES


def _scan_split(tree: _Tree, split: str) -> dict[str, list[str]]:
    """{class: sorted relative file names} of one split; raises on stray files, non-images, empty classes."""
    by_class: dict[str, list[str]] = {c: [] for c in tree.subdirs(split)}
    for rel in tree.files:
        parts = PurePosixPath(rel).parts
        if parts[0] != split or any(_skipped(p) for p in parts):
            continue
        if len(parts) == 2:
            raise ImageDataError(f"{tree.where(rel)}: file outside a class folder "
                                 f"(expected {split}/<class>/{parts[1]})")
        if PurePosixPath(rel).suffix.lower() not in IMAGE_EXTENSIONS:
            raise ImageDataError(f"{tree.where(rel)}: not an image file (extensions read: {', '.join(IMAGE_EXTENSIONS)})")
        by_class.setdefault(parts[1], []).append(rel)
    for cls, files in by_class.items():
        if not files:
            raise ImageDataError(f"{tree.where(f'{split}/{cls}')}: empty class folder (no image files)")
    return {c: sorted(by_class[c]) for c in sorted(by_class)}


def _decode(tree: _Tree, rel: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(tree.read(rel))) as img:
            return np.asarray(img.convert("RGB"))  # convert() decodes every pixel: truncated files fail here
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError... for corrupt or odd files
        raise ImageDataError(f"{tree.where(rel)}: unreadable image ({type(e).__name__}: {e})") from None


def _subset(items: list[tuple[str, int]], n: int | None, seed: int, what: str) -> list[tuple[str, int]]:
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise ImageDataError(f"{what} must be >= 1, got {n}")
    return sorted(random.Random(f"verakit:{what}:{seed}").sample(items, n))


def _split(tree: _Tree, name: str, items: list[tuple[str, int]]) -> ImageSplit:
    images = tuple(_decode(tree, rel) for rel, _ in items)
    return ImageSplit(name, images, tuple(y for _, y in items), tuple(tree.where(rel) for rel, _ in items))


def _index(tree: _Tree) -> tuple[str, dict[str, list[str]], dict[str, list[str]]]:
    """(evaluation split name, train files by class, evaluation files by class), checked."""
    tops = {PurePosixPath(f).parts[0] for f in tree.files if len(PurePosixPath(f).parts) > 1}
    if "train" not in tops:
        raise ImageDataError(f"{tree.where('train')}: no train/ folder of images "
                             "(expected train/<class>/*.jpg and test/<class>/*.jpg)")
    eval_name = next((s for s in EVAL_SPLITS if s in tops), None)
    if eval_name is None:
        raise ImageDataError(f"{tree.where('test')}: no evaluation split (expected test/<class>/*.jpg; "
                             f"also accepted: {', '.join(EVAL_SPLITS[1:])})")
    train, test = _scan_split(tree, "train"), _scan_split(tree, eval_name)
    if set(train) != set(test):
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise ImageDataError(f"{tree.source}: class folders differ between train/ and {eval_name}/: "
                             f"only in train/: {only_train or 'none'}; only in {eval_name}/: {only_test or 'none'}")
    if len(train) < 2:
        raise ImageDataError(f"{tree.where('train')}: {len(train)} class folder(s); classification needs at least 2")
    return eval_name, train, test


def _shots(tree: _Tree, train: dict[str, list[str]], shots: int, seed: int) -> dict[str, list[str]]:
    if shots < 1:
        raise ImageDataError(f"shots must be >= 1, got {shots}")
    out = {}
    for cls, files in train.items():
        if len(files) < shots:
            raise ImageDataError(f"{tree.where(f'train/{cls}')}: {shots} shots per class asked, "
                                 f"but the class has only {len(files)} images")
        out[cls] = sorted(random.Random(f"verakit:shots:{seed}:{cls}").sample(files, shots))
    return out


def load_images(
    source: str | Path,
    *,
    shots: int | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    decode_train: bool = True,
) -> ImageData:
    """Read and check an image folder or zip; decode the training and evaluation images kept.

    shots: keep N training images per class (the few-shot protocol), drawn without replacement by a
        choice that depends only on (seed, class name, file names); a class with fewer is an error.
    max_train_samples / max_eval_samples: then keep a seeded random subset of that many images.
    decode_train: False for evaluation only: train/ is still listed and checked, but no image of it is
        decoded, and the returned train split is empty.
    A folder and a zip of the same files give the same data, image for image.
    """
    source = Path(source).expanduser()
    tree = _Tree(source)
    try:
        eval_name, train, test = _index(tree)
        if shots is not None:
            train = _shots(tree, train, shots, seed)
        classes = tuple(train)  # sorted by _scan_split
        train_items = [(rel, y) for y, cls in enumerate(classes) for rel in train[cls]]
        test_items = [(rel, y) for y, cls in enumerate(classes) for rel in test[cls]]
        train_items = _subset(train_items, max_train_samples, seed, "max_train_samples")
        test_items = _subset(test_items, max_eval_samples, seed, "max_eval_samples")
        if not decode_train:
            train_items = []
        return ImageData(str(source), classes, _split(tree, "train", train_items),
                         _split(tree, eval_name, test_items))
    finally:
        tree.close()


def class_counts(data: ImageData) -> dict[str, dict[str, int]]:
    """{split name: {class: number of images}}, for run reports."""
    def counts(split: ImageSplit) -> dict[str, int]:
        return {c: split.labels.count(i) for i, c in enumerate(data.classes)}

    return {data.train.name: counts(data.train), data.test.name: counts(data.test)}


def image_fingerprint(data: ImageData) -> str:
    """`rundir.data_fingerprint` of the images a run trains and evaluates on: the class names, then per split each
    image's label, shape and sha256 of its decoded pixels (not its path: the same images moved elsewhere are the
    same data), so that a --resume over another folder, or images edited since, is refused."""
    import hashlib

    from ..rundir import data_fingerprint

    def examples(split: ImageSplit) -> list[tuple[int, tuple[int, ...], str]]:
        return [(y, img.shape, hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest())
                for img, y in zip(split.images, split.labels, strict=True)]

    return data_fingerprint(data.classes, examples(data.train), examples(data.test))
