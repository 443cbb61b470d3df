"""verakit: VeRA (Vector-based Random Matrix Adaptation) for PyTorch and transformers models.

Core API (torch + safetensors only): attach VeRA to a model, train its vectors, save/load tiny adapter
files, merge into the base weights.
"""

from . import _torch_check  # noqa: F401  (first: refuses a torch older than the layers need)
from ._version import __version__
from .config import ConfigError, VeraConfig
from .fileformat import Adapter, AdapterError, BaseMismatchError, load_adapter, read_adapter, save_adapter
from .inject import (
    AttachError,
    attach,
    detach,
    set_compute_dtype,
    set_input_recompute,
    trainable_parameters,
    vera_layers,
    vera_state,
)
from .layer import VeraLinear
from .layer_conv import VeraConv
from .layer_embedding import VeraEmbedding
from .merge import export_merged, merge, unmerge

__all__ = [
    "__version__",
    "VeraConfig",
    "ConfigError",
    "AttachError",
    "AdapterError",
    "BaseMismatchError",
    "Adapter",
    "VeraLinear",
    "VeraConv",
    "VeraEmbedding",
    "attach",
    "detach",
    "set_compute_dtype",
    "set_input_recompute",
    "trainable_parameters",
    "vera_layers",
    "vera_state",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "merge",
    "unmerge",
    "export_merged",
]
