"""Image classification on class folders (ViT, DeiT, BEiT, Swin...): `verakit train --task images`.

    recipe.py   ImageArgs, the model and its processor, ImageRecipe, train_images, evaluate_images
    images.py   load_images: folders or zips of train/<class>/ and test/<class>/
    report.py   report.md with per-class accuracy and the confusion matrix

Imports the shared layer of verakit.train only. Names resolve on first access.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "IMAGE_DEFAULTS": "recipe",
    "IMAGE_TASK": "recipe",
    "augment_batch": "recipe",
    "load_image_processor": "recipe",
    "ImageArgs": "recipe",
    "ImageRecipe": "recipe",
    "build_image_classifier": "recipe",
    "evaluate_images": "recipe",
    "score_split": "recipe",
    "train_images": "recipe",
    "load_images": "images",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
