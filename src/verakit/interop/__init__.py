"""Interoperate with the ecosystem: PEFT VeRA import/export and exact VeRA -> LoRA export.

Nothing here needs the `peft` package: PEFT directories are plain JSON + safetensors. transformers is
imported only to load a base model from a directory.
"""

from .convert import DIRECTIONS, convert
from .factors import vera_factors
from .lora import LoraExport, lora_factors, to_lora
from .peft_vera import from_peft, to_peft
from .peftdir import PeftDir, describe_peft_dir, is_peft_dir, read_peft_dir

__all__ = [
    "from_peft",
    "to_peft",
    "to_lora",
    "lora_factors",
    "LoraExport",
    "vera_factors",
    "PeftDir",
    "read_peft_dir",
    "is_peft_dir",
    "describe_peft_dir",
    "convert",
    "DIRECTIONS",
]
