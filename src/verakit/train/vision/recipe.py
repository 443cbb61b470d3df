"""The image-classification recipe: adapt a transformers image classifier (ViT, DeiT, BEiT, Swin...) to
the classes of an image folder or zip with VeRA, LoRA, full fine-tuning or the head only.

`train_images(ImageArgs)` writes into RUN_DIR the same outputs as the text recipe (classify.py): the
best evaluation's artifact, `config.json`, `metrics.json` (with per-class accuracy and the confusion
matrix of that evaluation), `report.md` and `curve.png`. Data is read and checked before RUN_DIR exists.

The model comes from `AutoModelForImageClassification` with one output per class folder. Its head is new
(`ignore_mismatched_sizes=True` for a checkpoint with another number of classes, and re-initialised when a
checkpoint head of the right size was trained on other class names); it trains with its own learning rate.
Images are preprocessed by the model's own image processor (`AutoImageProcessor`); for a local folder
without `preprocessor_config.json`, by a resize to `config.image_size`, rescale to [0, 1] and
normalisation with mean = std = 0.5 (ViT's convention), with a warning. No torchvision is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import artifact_path, read_artifact_info, recorded, save_artifact, warn_other_base
from ..hparams import IMAGE_DEFAULTS, defaults, fill
from ..loop import ParamGroup
from ..methods import MethodSpec, Prepared, head_modules, method_config, prepare_model
from ..rundir import artifact_metrics, environment, field_defaults, jsonable, loop_metrics
from ..runner import EVAL_BATCH, classification_loss, load_trained, open_run, param_groups
from .images import ImageData, ImageSplit, class_counts, image_fingerprint, load_images

__all__ = [
    "IMAGE_TASK",
    "IMAGE_DEFAULTS",
    "ImageArgs",
    "ImageRecipe",
    "augment_batch",
    "build_image_classifier",
    "load_image_processor",
    "score_split",
    "train_images",
    "evaluate_images",
]

log = logging.getLogger("verakit.train")
IMAGE_TASK = "images"


@dataclass(frozen=True)
class ImageArgs:
    """`verakit train --task images`'s arguments. None means "the method's default" (IMAGE_DEFAULTS)."""

    data_dir: str  # folder or .zip with train/<class>/* and test/<class>/* (images.py)
    out: str  # RUN_DIR
    model: str | None = None  # local folder or hub id of an image classifier or backbone; required
    method: str = "vera"  # vera, lora, full or head
    r: int | None = None  # VeRA 256, LoRA 8
    d_initial: float = 0.1
    target_modules: tuple[str, ...] | None = None  # None: the model type's default (query, value)
    epochs: int | None = None
    batch_size: int | None = None  # global batch; None: 32
    lr: float | None = None  # adapter (or body, for full) learning rate
    head_lr: float | None = None
    warmup_ratio: float = 0.06
    seed: int = 0  # shots, subsets, order, head init, augmentation, dropout and VeRA projection
    shots: int | None = None  # training images per class (few-shot); None: all
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    augment: bool = False  # random horizontal flip and shift of up to 1/8 of the side, training only
    magnitude: bool = False  # DVoRA (VeraConfig.magnitude), method vera: linear and convolution layers alike
    eval_every: int | None = None
    resume: bool = False
    quiet: bool = False

    def resolved(self) -> ImageArgs:
        """A copy with every None default filled in for this method."""
        if self.method not in IMAGE_DEFAULTS:
            raise ValueError(f"unknown method {self.method!r} for images; choose one of {', '.join(IMAGE_DEFAULTS)}")
        if self.model is None:
            raise ValueError("--task images needs --model: a local folder or hub id of a transformers image "
                             "classifier or backbone (no pretrained vision model installs offline; "
                             "experiments/vit_cifar.py builds one)")
        return fill(self, defaults("images", IMAGE_TASK, self.method))


def load_image_processor(path: str, config: Any) -> Any:
    """The model's own image processor, or the documented fallback for a local folder without one."""
    from transformers import AutoImageProcessor

    folder = Path(path).expanduser()
    if not folder.is_dir() or (folder / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(path)
    size = getattr(config, "image_size", None)
    if size is None:
        raise ValueError(f"{folder}: no preprocessor_config.json, and config.json has no image_size to resize to; "
                         "save the model's image processor into the folder")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    log.warning("%s has no preprocessor_config.json: resizing to %dx%d, mean = std = 0.5", folder, height, width)
    try:  # transformers >= 5: the Pillow implementation by name (the default one wants torchvision)
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # transformers 4: ViTImageProcessor is the Pillow one
        from transformers import ViTImageProcessor as Processor
    return Processor(size={"height": height, "width": width}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def build_image_classifier(model_name: str, classes: Sequence[str]) -> tuple[nn.Module, Any]:
    """(AutoModelForImageClassification with a new head of len(classes) outputs, its image processor)."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageClassification

    from ...models import locate_model

    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    # A hub id the hub cannot serve and the cache lacks fails here in one line, not after a minute of retries.
    path = locate_model(model_name)
    source = AutoConfig.from_pretrained(path)
    source_labels = tuple(source.id2label[i] for i in sorted(source.id2label))
    try:
        model = AutoModelForImageClassification.from_pretrained(
            path,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)},
            ignore_mismatched_sizes=True,
        )
    except ValueError as e:  # e.g. a text model: transformers lists every image model type, 40 lines
        raise ValueError(f"--model {model_name}: a {source.model_type!r} model, which transformers cannot load as an "
                         f"image classifier ({str(e).splitlines()[0]})") from None
    if source_labels != tuple(classes):
        # A checkpoint head of the right size but trained on other classes would be loaded as is; its
        # weights mean nothing for these classes, so it starts afresh like a mismatched one.
        std = getattr(model.config, "initializer_range", 0.02)
        with torch.no_grad():
            for name in head_modules(model):
                for m in model.get_submodule(name).modules():
                    if isinstance(m, nn.Linear):
                        nn.init.trunc_normal_(m.weight, std=std)
                        if m.bias is not None:
                            m.bias.zero_()
    return model, load_image_processor(path, model.config)


def augment_batch(pixels: torch.Tensor) -> torch.Tensor:
    """Semantics: per image, flip left-right with p = 1/2, then shift by (dy, dx) uniform in [-p, p]^2
    pixels with reflected borders, p = max(1, H // 8) (the usual CIFAR recipe); uses torch's global RNG,
    which the loop seeds and checkpoints. pixels: (B, C, H, W) -> (B, C, H, W)."""
    n, _, h, w = pixels.shape
    flip = torch.rand(n) < 0.5  # (B,)
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    p = max(1, h // 8)
    padded = F.pad(pixels, (p, p, p, p), mode="reflect")  # (B, C, H + 2p, W + 2p)
    dy, dx = torch.randint(0, 2 * p + 1, (n,)), torch.randint(0, 2 * p + 1, (n,))
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def _pixels(processor: Any, split: ImageSplit, indices: Sequence[int]) -> torch.Tensor:
    """(B, C, H, W) float pixel values of these images, as the model's processor prepares them."""
    return processor(images=[split.images[i] for i in indices], return_tensors="pt")["pixel_values"]


def score_split(model: nn.Module, processor: Any, split: ImageSplit, classes: Sequence[str]) -> tuple[
        dict[str, float], dict[str, Any]]:
    """(metrics, detail) of `model` on `split`: accuracy and mean per-class accuracy; per-class accuracy
    (None for a class absent from the split) and the confusion matrix (rows: true class)."""
    from sklearn.metrics import confusion_matrix

    device = next(model.parameters()).device
    predictions = []
    with torch.no_grad():
        for start in range(0, len(split), EVAL_BATCH):
            idx = range(start, min(start + EVAL_BATCH, len(split)))
            logits = model(pixel_values=_pixels(processor, split, idx).to(device)).logits  # (B, K)
            predictions += logits.argmax(-1).cpu().tolist()
    cm = confusion_matrix(list(split.labels), predictions, labels=list(range(len(classes))))  # (K, K)
    totals = cm.sum(axis=1)
    per_class = {c: (float(cm[i, i] / totals[i]) if totals[i] else None) for i, c in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    metrics = {"accuracy": float(cm.trace() / cm.sum()), "mean_class_accuracy": float(sum(present) / len(present))}
    return metrics, {"per_class_accuracy": per_class, "confusion_matrix": cm.tolist()}


class ImageRecipe:
    """The loop's Recipe for image classification (accuracy on the evaluation split)."""

    main_metric = "accuracy"

    def __init__(self, prepared: Prepared, processor: Any, data: ImageData, args: ImageArgs,
                 info: dict[str, Any]) -> None:
        self.model = prepared.model
        self.prepared = prepared
        self.processor = processor
        self.data = data
        self.args = args
        self.info = info
        self.best_detail: dict[str, Any] = {}  # per-class detail of the evaluation whose artifact was saved
        self._last_detail: dict[str, Any] = {}

    def param_groups(self) -> list[ParamGroup]:
        return param_groups(self.prepared, self.args.lr, self.args.head_lr)

    def num_train(self) -> int:
        return len(self.data.train)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        pixels = _pixels(self.processor, self.data.train, indices)
        if self.args.augment:
            pixels = augment_batch(pixels)
        labels = torch.tensor([self.data.train.labels[i] for i in indices], dtype=torch.long)
        return {"pixel_values": pixels, "labels": labels}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = model(pixel_values=batch["pixel_values"]).logits  # (B, K)
        return classification_loss(logits, batch["labels"], regression=False)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics, self._last_detail = score_split(model, self.processor, self.data.test, self.data.classes)
        return metrics

    def baseline(self) -> dict[str, float]:
        """score_split's metrics of always answering one class, the most frequent of the evaluation split:
        accuracy is its share; mean class accuracy is 1 / (classes present), as that class is always right
        and every other always wrong (the same for any constant answer)."""
        labels = self.data.test.labels
        counts = [labels.count(c) for c in sorted(set(labels))]
        return {"accuracy": max(counts) / len(labels), "mean_class_accuracy": 1.0 / len(counts)}

    def save_best(self, model: nn.Module, run_dir: Path) -> None:
        # The loop calls save_best right after the evaluate() that made this the best so far.
        self.best_detail = self._last_detail
        save_artifact(self.args.method, model, run_dir, self.info)


def train_images(args: ImageArgs) -> dict[str, Any]:
    """Train per `args`, write RUN_DIR, and return the content of metrics.json."""
    from .report import write_image_report

    args = args.resolved()
    run = open_run(args)
    data = load_images(args.data_dir, shots=args.shots, max_train_samples=args.max_train_samples,
                       max_eval_samples=args.max_eval_samples, seed=args.seed)
    torch.manual_seed(args.seed)  # the new head's initialisation (and LoRA's A)
    model, processor = build_image_classifier(str(args.model), data.classes)
    prepared = prepare_model(model, MethodSpec(args.method, int(args.r or 0), args.d_initial, args.target_modules,
                                               args.seed, magnitude=args.magnitude))
    from ...models import recorded_model

    info = {"task": IMAGE_TASK, "model": recorded_model(args.model), "labels": list(data.classes), "seed": args.seed,
            "max_eval_samples": args.max_eval_samples, "data_dir": args.data_dir, "shots": args.shots}
    recipe = ImageRecipe(prepared, processor, data, args, info)
    # defaults: a run started before an option existed (e.g. --magnitude) resumes with the option at its default
    run.start(jsonable(asdict(args)), method_config(prepared, args.method), defaults=field_defaults(ImageArgs),
              data=image_fingerprint(data))
    result = run.train(recipe)
    if not result.best:  # a non-main process under DDP: the main one writes the results
        return {}
    artifact = artifact_path(args.method, run.dir)
    if not recipe.best_detail:  # resumed after the best evaluation: score the saved artifact again
        trained, _ = load_trained(artifact, lambda: build_image_classifier(str(args.model), data.classes))
        recipe.best_detail = score_split(trained, processor, data.test, data.classes)[1]
    metrics = {
        "task": IMAGE_TASK,
        "method": args.method,
        "model": args.model,
        "metric": result.best["metrics"],
        "main_metric": ImageRecipe.main_metric,
        "final_metric": result.history[-1]["metrics"],  # last evaluation: no selection on the evaluation split
        "best_step": result.best["step"],
        "best_epoch": result.best["epoch"],
        "classes": list(data.classes),
        "shots": args.shots,
        "per_class_accuracy": recipe.best_detail["per_class_accuracy"],
        "confusion_matrix": recipe.best_detail["confusion_matrix"],
        **artifact_metrics(prepared, artifact),
        **loop_metrics(result),
        "n_train": len(data.train),
        "n_eval": len(data.test),
        "eval_split": data.test.name,
        "data": class_counts(data),
        "epochs": result.history,
        "environment": environment(),
    }
    return run.finish(metrics, write_image_report)


def evaluate_images(
    adapter: str | Path,
    *,
    data_dir: str | None = None,
    model: str | None = None,
    max_eval_samples: int | None = None,
    check_base: bool = True,
) -> dict[str, Any]:
    """Accuracy and per-class accuracy of a saved artifact on the evaluation split of an image folder.

    Unset arguments come from the run info saved with the artifact (same folder, subset seed, base model),
    so by default this reproduces the evaluation that picked the checkpoint.
    """
    info = read_artifact_info(adapter)
    data_dir = recorded(info, adapter, "data_dir", data_dir, "--data-dir")
    warn_other_base(adapter, info, model, None)
    model = recorded(info, adapter, "model", model, "--model")  # images have no default model
    max_eval = max_eval_samples if max_eval_samples is not None else info.get("max_eval_samples")
    data = load_images(data_dir, max_eval_samples=max_eval, seed=int(info.get("seed", 0)), decode_train=False)
    if info.get("labels") and list(data.classes) != list(info["labels"]):
        raise ValueError(f"{adapter}: trained on classes {info['labels']}, but {data_dir} has {list(data.classes)}")
    trained, processor = load_trained(adapter, lambda: build_image_classifier(str(model), data.classes), check_base)
    metrics, detail = score_split(trained, processor, data.test, data.classes)
    return {"task": IMAGE_TASK, "method": info.get("method"), "metric": metrics, **detail,
            "n_eval": len(data.test), "eval_split": data.test.name, "adapter": str(adapter)}
