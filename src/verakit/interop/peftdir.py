"""PEFT adapter directories on disk: `adapter_config.json` + `adapter_model.safetensors`.

Reading validates the directory and names the file and fault; writing is atomic (the directory is
built beside its destination, then renamed). Tensor keys are PEFT's checkpoint keys: per-module
`base_model.model.<module>.<param>` and, for VeRA, the shared `base_model.vera_A` / `base_model.vera_B`.
The `peft` package itself is not needed to read or write these directories.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import new_dir
from ..fileformat import Adapter, AdapterError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "MODEL_PREFIX",
    "PeftDir",
    "read_peft_dir",
    "write_peft_dir",
    "is_peft_dir",
    "peft_task_type",
    "common_config",
    "load_peft_base",
    "describe_peft_dir",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LEGACY_WEIGHTS = "adapter_model.bin"
MODEL_PREFIX = "base_model.model."

# transformers class-name suffix -> PEFT task_type (decides which PeftModel subclass loads the directory).
_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)
_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


@dataclass(frozen=True)
class PeftDir:
    """A PEFT adapter directory as read from disk.

    config: the parsed adapter_config.json. tensors: checkpoint key -> tensor (as stored).
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type"))

    def fail(self, msg: str) -> AdapterError:
        return AdapterError(f"{self.path}: {msg}")

    def module_tensors(self, suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
        """{module name (without MODEL_PREFIX): {suffix: tensor}} for keys `<prefix><module>.<suffix>`."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.tensors.items():
            if not key.startswith(MODEL_PREFIX):
                continue
            for suffix in suffixes:
                if key.endswith("." + suffix):
                    out.setdefault(key[len(MODEL_PREFIX) : -len(suffix) - 1], {})[suffix] = t
        return out


def is_peft_dir(path: str | os.PathLike[str]) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def read_peft_dir(path: str | os.PathLike[str], peft_type: str | None = None) -> PeftDir:
    """Read and check a PEFT adapter directory; `peft_type` ("VERA", "LORA") is enforced when given."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory; a PEFT adapter is a directory with {CONFIG_NAME}")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{path}: missing {CONFIG_NAME}, so this is not a PEFT adapter directory")
    try:
        config = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterError(f"{cfg_path}: no peft_type field, so this is not a PEFT adapter config")
    if peft_type is not None and str(config["peft_type"]).upper() != peft_type:
        raise AdapterError(f"{cfg_path}: peft_type is {config['peft_type']!r}, expected {peft_type!r}")
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        try:
            tensors = load_file(weights)
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"{weights}: unreadable safetensors file ({e})") from None
    elif (path / _LEGACY_WEIGHTS).is_file():
        try:
            tensors = torch.load(path / _LEGACY_WEIGHTS, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many types for corrupt pickles
            raise AdapterError(f"{path / _LEGACY_WEIGHTS}: unreadable ({type(e).__name__}: {e})") from None
    else:
        raise AdapterError(f"{path}: missing {WEIGHTS_NAME} (the adapter weights)")
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{weights}: tensor {k!r} contains NaN or Inf")
    return PeftDir(path, config, tensors)


def write_peft_dir(out_dir: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write `config` and `tensors` as a PEFT adapter directory, atomically; refuses a non-empty `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    with new_dir(out) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    return out


def peft_task_type(architecture: str) -> str | None:
    """PEFT's task_type for a transformers class name, e.g. "BertForSequenceClassification" -> "SEQ_CLS"."""
    for suffix, task in _TASK_TYPES:
        if architecture.endswith(suffix):
            return task
    return None


def common_config(adapter: Adapter, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json fields that PEFT VeRA and LoRA exports of `adapter` share."""
    return {
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": peft_task_type(adapter.architecture),
        # Full module names: exact under PEFT's matching; LoRA engines read their last component.
        "target_modules": sorted(adapter.modules),
        "modules_to_save": list(adapter.config.modules_to_save) if adapter.saved else None,
        "fan_in_fan_out": any(kind == "conv1d" for _, _, kind in adapter.modules.values()),
        "bias": "none",
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def load_peft_base(model_dir: str | os.PathLike[str], peft: PeftDir) -> nn.Module:
    """Load the base model a PEFT adapter was trained on from `model_dir`, with the class its task_type implies.

    A sequence-classification head is sized from the adapter's saved head weights.
    """
    import transformers

    task = peft.config.get("task_type")
    auto = (peft.config.get("auto_mapping") or {}).get("base_model_class")
    cls_name = _AUTO_CLASSES.get(str(task), auto or "AutoModel")
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise peft.fail(f"unknown base model class {cls_name!r}; load the model yourself and pass it in")
    kwargs: dict[str, Any] = {}
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        for suffix in (".classifier.weight", ".score.weight", ".classifier.out_proj.weight"):
            heads = [t for k, t in peft.tensors.items() if k.endswith(suffix)]
            if heads:
                kwargs["num_labels"] = int(heads[0].shape[0])
                break
    return cls.from_pretrained(str(model_dir), **kwargs).eval()


def describe_peft_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-able summary of a PEFT VeRA or LoRA directory (what `verakit inspect DIR` prints)."""
    peft = read_peft_dir(path)
    kind = peft.peft_type.upper()
    cfg = peft.config
    if kind == "VERA":
        parts = peft.module_tensors(("vera_lambda_d", "vera_lambda_b"))
        # A VeRA checkpoint has no d_in per layer (only the shared vera_A's largest one).
        modules = {n: [int(v["vera_lambda_b"].shape[0]) if "vera_lambda_b" in v else None, None] for n, v in parts.items()}
        a = peft.tensors.get("base_model.vera_A")
        b = peft.tensors.get("base_model.vera_B")
        extra: dict[str, Any] = {
            "projection": {
                "saved": a is not None,
                "projection_prng_key": cfg.get("projection_prng_key"),
                "vera_A": list(a.shape) if a is not None else None,
                "vera_B": list(b.shape) if b is not None else None,
            }
        }
        adapter_keys = {f"{MODEL_PREFIX}{n}.{p}" for n, v in parts.items() for p in v}
    elif kind == "LORA":
        parts = peft.module_tensors(("lora_A.weight", "lora_B.weight"))
        modules = {
            n: [int(v["lora_B.weight"].shape[0]) if "lora_B.weight" in v else None,
                int(v["lora_A.weight"].shape[1]) if "lora_A.weight" in v else None]
            for n, v in parts.items()
        }
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        extra = {"lora_alpha": alpha, "scaling": (alpha / r) if r and alpha is not None and not cfg.get("use_rslora") else None}
        adapter_keys = {f"{MODEL_PREFIX}{n}.{p}" for n, v in parts.items() for p in v}
    else:
        raise peft.fail(f"peft_type {peft.peft_type!r}: verakit reads VERA and LORA adapters")
    saved_keys = set(peft.tensors) - adapter_keys - {"base_model.vera_A", "base_model.vera_B"}
    saved = sorted(k.removeprefix(MODEL_PREFIX) for k in saved_keys)
    return {
        "dir": str(peft.path),
        "peft_type": kind,
        "task_type": cfg.get("task_type"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "peft_version": cfg.get("peft_version"),
        "r": cfg.get("r"),
        "target_modules": cfg.get("target_modules"),
        "layers": len(modules),
        "adapter_params": sum(peft.tensors[k].numel() for k in adapter_keys),
        "saved_params": sum(peft.tensors[k].numel() for k in saved_keys),
        "saved_tensors": saved,
        "bytes": sum(f.stat().st_size for f in peft.path.iterdir() if f.is_file()),
        **extra,
        "modules": modules,
    }
