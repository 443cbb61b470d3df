"""transformers glue: build the base model an adapter was trained on. Imports transformers lazily."""

from __future__ import annotations

from torch import nn

from .fileformat import Adapter, AdapterError

__all__ = ["load_base_for_adapter"]


def load_base_for_adapter(model_dir: str, adapter: Adapter) -> nn.Module:
    """`<architecture>.from_pretrained(model_dir)` for the adapter's recorded architecture.

    A classification head the adapter saves is sized from the adapter (its label names when known).
    """
    import transformers

    arch = adapter.architecture
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise AdapterError(f"{adapter.path}: unknown model architecture {arch!r}; load the model yourself and call load_adapter")
    kwargs = {}
    labels = adapter.extra.get("labels")
    if labels:
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    return cls.from_pretrained(model_dir, **kwargs)
