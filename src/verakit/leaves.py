"""Which leaves VeRA adapts, and each one's shape as a linear map (docs/format.md, "Layer kinds").

Re-exported by `layer`, where callers have always imported them from.
"""

from __future__ import annotations

from torch import nn

from .quant import quant_kind

__all__ = ["CONV_TYPES", "is_linear_leaf", "is_conv1d_leaf", "is_conv_leaf", "is_embedding_leaf", "linear_shape"]

# torch's convolutions (not transformers' Conv1D, which is a transposed linear layer): `layer_conv`.
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_linear_leaf(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: weight stored transposed as (d_in, d_out))."""
    return isinstance(module, nn.Linear) or is_conv1d_leaf(module)


def is_conv1d_leaf(module: nn.Module) -> bool:
    # Checked by name so the core never imports transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_conv_leaf(module: nn.Module) -> bool:
    """torch's nn.Conv1d / Conv2d / Conv3d (transposed convolutions are not adaptable)."""
    return isinstance(module, CONV_TYPES)


def is_embedding_leaf(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an adaptable leaf viewed as a linear map: the slices A[:r, :d_in], B[:d_out, :r]
    it takes from the shared tables (docs/format.md, "Layer kinds").

    Linear: (out, in); Conv1D: its (d_in, d_out) weight transposed; quantized: the logical shape (the
    weight may be packed); nn.ConvNd: (C_out, C_in/groups * prod(kernel)), the kernel flattened as
    weight.reshape(C_out, -1) (im2col order: input channel, then kernel positions); nn.Embedding:
    (embedding_dim, num_embeddings), the table as the map from one-hot token ids.
    """
    if quant_kind(module) is not None:
        return module.out_features, module.in_features
    w = module.weight
    if is_embedding_leaf(module):
        return w.shape[1], w.shape[0]
    if is_conv_leaf(module):
        return w.shape[0], w[0].numel()
    return (w.shape[1], w.shape[0]) if is_conv1d_leaf(module) else (w.shape[0], w.shape[1])
