"""The four fine-tuning methods compared in the paper, on a transformers model, and PEFT's own VeRA as
the anchor verakit's is measured against; every recipe prepares its model here (artifacts.py saves and
loads what it trained).

* ``vera``: verakit's VeRA on the target layers; artifact: one verakit adapter file.
* ``lora``: PEFT's LoRA (not our own) on the same targets, alpha = r; artifact: a PEFT adapter folder.
* ``peft-vera``: PEFT's VeRA (not our own) on the same targets, projection key = the seed, projections
  not saved (PEFT regenerates them from the key); artifact: a PEFT adapter folder.
* ``full``: every parameter trains; artifact: a safetensors file of all trained tensors.
* ``head``: only the task head trains; artifact: a safetensors file of the head's tensors.

Every method trains the same head: the modules that `verakit.attach` trains and saves with an adapter
(``classifier``, and BERT's ``pooler``, which all-MiniLM-L6-v2 never trained). Head parameters are
counted separately from the adapter's, as in the paper. A model without a task head (a causal LM, whose
output layer is the language model's own) is prepared with head ``NO_HEAD``: every trained parameter is
the adapter's (``head`` has no meaning there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "METHODS",
    "PEFT_METHODS",
    "HEADS",
    "NO_HEAD",
    "VERA_OPTION_DEFAULTS",
    "MethodSpec",
    "Prepared",
    "head_modules",
    "prepare_model",
    "method_config",
]

METHODS = ("vera", "lora", "full", "head", "peft-vera")
PEFT_METHODS = ("lora", "peft-vera")  # trained through PEFT's get_peft_model; artifact: a PEFT folder
# How the task head trains: "full" (every head parameter, saved in fp32) or "vera" (VeRA vectors on the
# head's hidden layers, e.g. BERT's pooler.dense, and only the output layer in full). docs/training.md,
# "Classification heads", gives the measurements behind the default.
HEADS = ("full", "vera")
NO_HEAD = "none"  # MethodSpec.head of a model without a task head (causal LMs); not a --head choice
_UNSAVED_PROJECTION = "Specified to not (save|load) vera_A and vera_B"  # PEFT VeRA warnings, expected here


@dataclass(frozen=True)
class MethodSpec:
    method: str  # one of METHODS
    r: int  # VeRA's projection rank or LoRA's rank (unused by full/head)
    d_initial: float  # VeRA's initial d (both VeRAs)
    target_modules: tuple[str, ...] | str | None  # None: the model type's default (query, value for BERT); "all-linear"
    seed: int  # VeRA's projection seed (PEFT VeRA's projection_prng_key)
    # VeRA ablation options (VeraConfig documents them): freeze d or b, projection values, sharing.
    train_d: bool = True
    train_b: bool = True
    distribution: str = "kaiming_uniform"
    projection_sharing: str = "shared"
    head: str = "full"  # one of HEADS, or NO_HEAD
    magnitude: bool = False  # DVoRA (VeraConfig.magnitude): a trained magnitude per output row

    def __post_init__(self) -> None:
        if self.head not in (*HEADS, NO_HEAD):
            raise ValueError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.head == "vera" and self.method not in ("vera", *PEFT_METHODS):
            raise ValueError(f"head 'vera' adapts the head's hidden layers with the adapter, but the method "
                             f"{self.method!r} trains {'everything' if self.method == 'full' else 'the head'} in full; "
                             "use head 'full'")
        if self.method != "vera":
            changed = [f for f, default in VERA_OPTION_DEFAULTS.items() if getattr(self, f) != default]
            if changed:
                raise ValueError(f"{', '.join(changed)}: VeRA options, but the method is {self.method!r}")


# MethodSpec's VeRA ablation fields and their defaults (VeraConfig's); other methods must keep them.
VERA_OPTION_DEFAULTS = {"train_d": True, "train_b": True, "distribution": "kaiming_uniform",
                         "projection_sharing": "shared", "magnitude": False}


@dataclass(frozen=True)
class Prepared:
    model: nn.Module  # the model to train (a peft.PeftModel for "lora" and "peft-vera")
    adapter: tuple[tuple[str, nn.Parameter], ...]  # trainable, not head: d/b, LoRA A/B, or the body
    head: tuple[tuple[str, nn.Parameter], ...]  # trainable head parameters
    has_head: bool = True  # False: prepared with NO_HEAD (a causal LM), `head` is empty

    @property
    def adapter_numel(self) -> int:
        return sum(p.numel() for _, p in self.adapter)

    @property
    def head_numel(self) -> int:
        return sum(p.numel() for _, p in self.head)


def head_modules(model: nn.Module) -> tuple[str, ...]:
    """Full names of the task head modules that `attach` would train and save for this model."""
    from ..config import VeraConfig
    from ..inject import _resolve_saved

    return _resolve_saved(model, VeraConfig())[1]


def _targets(model: nn.Module, spec: MethodSpec) -> tuple[str, ...] | str:
    """The adapted layers: the given or default body targets, plus the head's hidden layers for head 'vera'."""
    from ..config import DEFAULT_TARGETS
    from ..inject import head_hidden_layers

    if spec.target_modules is not None:
        body = spec.target_modules
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"no default target modules for model_type {model_type!r}; pass --target-modules")
        body = DEFAULT_TARGETS[model_type]
    if spec.head != "vera":
        return body
    if spec.target_modules is not None:
        # The head's hidden layers join the targets below, so attach() would find something to adapt even
        # when the given names match nothing, and the run would train the head alone: refuse that here.
        from ..config import VeraConfig
        from ..inject import find_targets

        find_targets(model, VeraConfig(target_modules=body))  # AttachError names the targets and the leaves
    return (*body, *(h for h in head_hidden_layers(model) if h not in body))


def prepare_model(model: nn.Module, spec: MethodSpec) -> Prepared:
    """Adapt `model` for `spec.method` and set which parameters train. VeRA/full/head work in place."""
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; choose one of {', '.join(METHODS)}")
    if spec.method in PEFT_METHODS:
        return _prepare_peft(model, spec)
    heads = head_modules(model) if spec.head != NO_HEAD else ()
    if not heads and spec.head != NO_HEAD:
        raise ValueError(f"{type(model).__name__} has no classification head (classifier/score) to train")
    in_head = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
    if spec.method == "vera":
        from ..config import VeraConfig
        from ..inject import attach, trainable_parameters

        # Without a head the targets go to VeraConfig as given (None: attach's default for the model type),
        # which is what a causal LM's saved config has always recorded.
        targets = spec.target_modules if spec.head == NO_HEAD else _targets(model, spec)
        attach(model, VeraConfig(r=spec.r, target_modules=targets, d_initial=spec.d_initial, seed=spec.seed,
                                 train_d=spec.train_d, train_b=spec.train_b, distribution=spec.distribution,
                                 projection_sharing=spec.projection_sharing, magnitude=spec.magnitude))
        trainable = trainable_parameters(model)
    else:
        for p in model.parameters():
            p.requires_grad_(spec.method == "full" or id(p) in in_head)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adapter = tuple((n, p) for n, p in trainable if id(p) not in in_head)
    head = tuple((n, p) for n, p in trainable if id(p) in in_head)
    return Prepared(model, adapter, head, has_head=spec.head != NO_HEAD)


def _prepare_peft(model: nn.Module, spec: MethodSpec) -> Prepared:
    from peft import get_peft_model
    from peft.utils import ModulesToSaveWrapper

    peft_model = get_peft_model(model, _peft_config(model, spec))
    in_head = {
        id(p) for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper) for p in m.modules_to_save.parameters()
    }
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    adapter = tuple((n, p) for n, p in trainable if id(p) not in in_head)
    head = tuple((n, p) for n, p in trainable if id(p) in in_head)
    return Prepared(peft_model, adapter, head, has_head=spec.head != NO_HEAD)


def _peft_config(model: nn.Module, spec: MethodSpec) -> Any:
    """PEFT's LoraConfig or VeraConfig for `spec`: the same targets and saved head parts as verakit's VeRA."""
    import warnings

    from peft import LoraConfig, TaskType, VeraConfig

    # PEFT's SEQ_CLS wrapper forwards input_ids/attention_mask only; an image classifier takes pixel_values,
    # which the plain PeftModel (task_type None) passes through unchanged. A model without a head is a causal
    # LM here: PEFT's CAUSAL_LM wrapper, which also generates.
    seq_cls = type(model).__name__.endswith("ForSequenceClassification")
    task_type = TaskType.SEQ_CLS if seq_cls else TaskType.CAUSAL_LM if spec.head == NO_HEAD else None
    targets = _targets(model, spec)  # a str ("all-linear") goes to PEFT as is
    common = {"task_type": task_type, "r": spec.r, "target_modules": targets if isinstance(targets, str) else list(targets),
              "modules_to_save": _peft_saved(model, spec)}
    if spec.method == "lora":
        # LoRA paper's RoBERTa setting: alpha = r = 8, so the scale alpha / r is 1.
        return LoraConfig(**common, lora_alpha=spec.r, lora_dropout=0.0)
    # Unsaved projections, as in verakit's files: PEFT rebuilds them from projection_prng_key at load (and
    # warns that it will, at every config it builds).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UNSAVED_PROJECTION)
        return VeraConfig(**common, projection_prng_key=spec.seed, save_projection=False, vera_dropout=0.0,
                          d_initial=spec.d_initial)


def _peft_saved(model: nn.Module, spec: MethodSpec) -> list[str] | None:
    """PEFT's modules_to_save: the head modules' leaf names, or for head 'vera' the head parts left unadapted;
    None without a head."""
    if spec.head == NO_HEAD:
        return None
    if spec.head == "full":
        return sorted({h.rpartition(".")[2] for h in head_modules(model)})
    from ..config import VeraConfig
    from ..inject import _resolve_saved

    return sorted(_resolve_saved(model, VeraConfig(target_modules=_targets(model, spec)))[0])


def method_config(prepared: Prepared, method: str) -> dict[str, Any]:
    """config.json's "method" entry: the VeraConfig, the LoRA / PEFT VeRA settings, or the first 50 trained
    names. Without a head (a causal LM) LoRA has no modules to save and its targets may be "all-linear",
    and full fine-tuning trains every parameter, so the entry says so instead of listing names."""
    if method == "vera":
        from ..inject import vera_state

        return vera_state(prepared.model).config.to_dict()
    if method == "lora":
        cfg = prepared.model.peft_config["default"]  # PEFT's own adapter name; one adapter per run
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
        if not prepared.has_head:
            return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": targets}
        return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": targets,
                "modules_to_save": sorted(set(cfg.modules_to_save or []))}
    if method == "peft-vera":
        cfg = prepared.model.peft_config["default"]
        return {"r": cfg.r, "d_initial": cfg.d_initial, "projection_prng_key": cfg.projection_prng_key,
                "save_projection": cfg.save_projection, "target_modules": sorted(cfg.target_modules),
                "modules_to_save": sorted(set(cfg.modules_to_save or []))}
    if not prepared.has_head and method == "full":
        return {"trainable": "all parameters"}
    return {"trainable": [n for n, _ in (*prepared.adapter, *prepared.head)][:50]}
