"""VeRA configuration: one frozen, validated dataclass. Standard library only.

Every field is documented once, here. Library code never mutates a config; `replace()` makes a new one.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["VeraConfig", "ConfigError", "DISTRIBUTIONS", "SHARING_MODES", "DEFAULT_TARGETS"]

DISTRIBUTIONS = ("kaiming_uniform", "kaiming_normal", "uniform")
SHARING_MODES = ("shared", "unique")

# Default target leaves per `model.config.model_type`: the attention query and value projections, as in
# the paper (and PEFT's table) for encoders and GPT-2's fused c_attn.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "vit": ("query", "value"),
    "deit": ("query", "value"),
}


class ConfigError(ValueError):
    """A VeraConfig field is invalid; the message names the field."""


@dataclass(frozen=True)
class VeraConfig:
    """What to adapt and how. Stored verbatim in every adapter file.

    r: rank of the shared random projections (rows of A, columns of B). Larger r costs nothing in
        adapter bytes per layer beyond `r` extra floats for `d`.
    target_modules: which linear leaves to adapt. A tuple of leaf names (or dotted suffixes) such as
        ("query", "value"); a string is a regex matched with `re.fullmatch` against full module names;
        "all-linear" adapts every linear leaf except the output/classifier head; None picks the default
        for `model.config.model_type` (DEFAULT_TARGETS).
    d_initial: initial value of every element of the scaling vector d. b starts at zero, so the adapted
        model equals the base model at init. The paper's ablation: 1.0 can collapse training.
    seed: seed of the shared projection pair; the pair is regenerated from it, never stored.
    dropout: dropout probability on the adapter path's input (0 disables it).
    modules_to_save: extra modules (by leaf name or dotted suffix) trained in full and saved in the
        adapter file, e.g. a classification head. `attach` adds a sequence-classification head itself.
    distribution: projection values: "kaiming_uniform" (default, bound sqrt(6 / fan_in)),
        "kaiming_normal" (std sqrt(2 / fan_in)) or "uniform" on [0, 0.1) (the paper's bad case).
    projection_sharing: "shared" (one pair for every layer, the VeRA method) or "unique" (one pair per
        layer from seeds derived from the layer name; an ablation, costs memory per layer).
    train_d / train_b: whether d / b are trained (ablation: freezing either costs accuracy).
    """

    r: int = 256
    target_modules: tuple[str, ...] | str | None = None
    d_initial: float = 0.1
    seed: int = 0
    dropout: float = 0.0
    modules_to_save: tuple[str, ...] = ()
    distribution: str = "kaiming_uniform"
    projection_sharing: str = "shared"
    train_d: bool = True
    train_b: bool = True

    def __post_init__(self) -> None:
        # Normalise list inputs (e.g. from JSON) to tuples so the config stays hashable and immutable.
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.modules_to_save, (list, str)):
            mts = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else self.modules_to_save
            object.__setattr__(self, "modules_to_save", tuple(mts))
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"VeraConfig.r must be an integer >= 1, got {self.r!r}")
        if self.r > 65536:
            raise ConfigError(f"VeraConfig.r must be <= 65536, got {self.r}")
        if not isinstance(self.d_initial, (int, float)) or isinstance(self.d_initial, bool):
            raise ConfigError(f"VeraConfig.d_initial must be a number, got {self.d_initial!r}")
        if not math.isfinite(self.d_initial):
            raise ConfigError(f"VeraConfig.d_initial must be finite, got {self.d_initial!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ConfigError(f"VeraConfig.seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"VeraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"VeraConfig.distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if self.projection_sharing not in SHARING_MODES:
            raise ConfigError(
                f"VeraConfig.projection_sharing must be one of {SHARING_MODES}, got {self.projection_sharing!r}"
            )
        if not isinstance(self.train_d, bool) or not isinstance(self.train_b, bool):
            raise ConfigError("VeraConfig.train_d and train_b must be booleans")
        if not (self.train_d or self.train_b):
            raise ConfigError("VeraConfig: train_d and train_b are both False, so nothing would be trained")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != "all-linear":
                try:
                    re.compile(tm)
                except re.error as e:
                    raise ConfigError(f"VeraConfig.target_modules is not a valid regex {tm!r}: {e}") from e
        elif tm is not None:
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise ConfigError(f"VeraConfig.target_modules must be non-empty strings, got {tm!r}")
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ConfigError(f"VeraConfig.modules_to_save must be non-empty strings, got {self.modules_to_save!r}")

    def replace(self, **changes: Any) -> VeraConfig:
        """A new config with `changes` applied (and validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        d["modules_to_save"] = list(d["modules_to_save"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VeraConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown VeraConfig field(s): {', '.join(unknown)}")
        return cls(**data)
