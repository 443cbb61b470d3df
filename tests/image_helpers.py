"""Generated image folders and a tiny random ViT for the image-classification tests."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

# A learnable task: each class is a base colour plus per-pixel noise.
COLORS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}


def write_images(root: Path, n_train: int = 12, n_test: int = 6, size: int = 16, seed: int = 0,
                 classes: dict[str, tuple[int, int, int]] = COLORS) -> Path:
    """root/{train,test}/<class>/NN.{png,jpg}: even files PNG, odd files JPEG (both decoders run)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls, rgb in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 40, (size, size, 3)), 0, 255)
                image = Image.fromarray(pixels.astype(np.uint8))
                image.save(folder / f"{i:02d}.png") if i % 2 == 0 else image.save(folder / f"{i:02d}.jpg", quality=90)
    return root


def zip_tree(root: Path, zip_path: Path, prefix: str = "", folders: bool = False) -> Path:
    """A ZIP_STORED copy of the files under root, paths prefixed by `prefix`; with `folders`, also the
    directory entries ("train/cls/"), as `zip -r` writes them."""
    with zipfile.ZipFile(zip_path, "w") as z:
        for p in sorted(root.rglob("*")):
            rel = prefix + p.relative_to(root).as_posix()
            if p.is_file():
                z.write(p, rel)
            elif folders:
                z.writestr(rel + "/", b"")
    return zip_path


def save_tiny_vit(folder: Path, num_labels: int = 2, labels: tuple[str, ...] | None = None, image_size: int = 16,
                  processor: bool = True, seed: int = 0) -> Path:
    """A random ViTForImageClassification (patch 4, hidden 32, 2 layers, no dropout) with its image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    names = labels or tuple(f"LABEL_{i}" for i in range(num_labels))
    cfg = ViTConfig(image_size=image_size, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    ViTForImageClassification(cfg).save_pretrained(folder)
    if processor:
        try:
            from transformers import ViTImageProcessorPil as Processor
        except ImportError:
            from transformers import ViTImageProcessor as Processor
        Processor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
