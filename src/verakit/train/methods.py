"""The four fine-tuning methods compared in the paper, on a transformers model, and PEFT's own VeRA as
the anchor verakit's is measured against; every recipe prepares its model and saves its artifact here.

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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..atomic import replacing_dir

__all__ = [
    "METHODS",
    "PEFT_METHODS",
    "HEADS",
    "NO_HEAD",
    "VERA_OPTION_DEFAULTS",
    "MethodSpec",
    "Prepared",
    "ArtifactError",
    "head_modules",
    "prepare_model",
    "artifact_path",
    "artifact_bytes",
    "save_artifact",
    "read_artifact_info",
    "artifact_in",
    "recorded",
    "load_artifact",
    "method_config",
]

METHODS = ("vera", "lora", "full", "head", "peft-vera")
PEFT_METHODS = ("lora", "peft-vera")  # trained through PEFT's get_peft_model; artifact: a PEFT folder
# How the task head trains: "full" (every head parameter, saved in fp32) or "vera" (VeRA vectors on the
# head's hidden layers, e.g. BERT's pooler.dense, and only the output layer in full). docs/training.md,
# "Classification heads", gives the measurements behind the default.
HEADS = ("full", "vera")
NO_HEAD = "none"  # MethodSpec.head of a model without a task head (causal LMs); not a --head choice
_TRAINED_FORMAT = "verakit.trained"  # safetensors metadata "format" of full/head artifacts
_UNSAVED_PROJECTION = "Specified to not (save|load) vera_A and vera_B"  # PEFT VeRA warnings, expected here
_PEFT_INFO = "verakit.json"  # run info beside PEFT's files in a LoRA / PEFT VeRA artifact folder


class ArtifactError(ValueError):
    """A trained artifact (adapter file, PEFT folder, trained tensors) is unusable; names the path."""


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


def artifact_path(method: str, run_dir: str | Path) -> Path:
    """Where `save_artifact` writes: adapter.safetensors (vera), adapter/ (lora, peft-vera), trained.safetensors."""
    run_dir = Path(run_dir)
    if method == "vera":
        return run_dir / "adapter.safetensors"
    if method in PEFT_METHODS:
        return run_dir / "adapter"
    return run_dir / "trained.safetensors"


def artifact_bytes(path: str | Path) -> int:
    """Bytes of the tensors file: the file itself, or a PEFT folder's adapter_model.safetensors."""
    path = Path(path)
    return (path / "adapter_model.safetensors").stat().st_size if path.is_dir() else path.stat().st_size


def save_artifact(method: str, model: nn.Module, run_dir: str | Path, info: dict[str, Any]) -> Path:
    """Write the trained weights of `model` and the run `info` (task, labels, max_length...) atomically."""
    path = artifact_path(method, run_dir)
    info = {**info, "method": method}
    if method == "vera":
        from ..fileformat import save_adapter

        save_adapter(model, path, extra=info)
    elif method in PEFT_METHODS:
        _save_peft(model, path, info)
    else:
        from safetensors.torch import save

        from ..fileformat import atomic_write_bytes

        tensors = {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
        meta = {"format": _TRAINED_FORMAT, "verakit": json.dumps(info)}
        atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def _save_peft(model: nn.Module, path: Path, info: dict[str, Any]) -> None:
    # save_pretrained writes several files: build the folder beside the target, then swap it in, so a
    # crash never leaves a half-written adapter/ behind.
    with replacing_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        (tmp / _PEFT_INFO).write_text(json.dumps(info, indent=2))


def read_artifact_info(path: str | Path) -> dict[str, Any]:
    """The run info stored with an artifact (includes "method"); raises ArtifactError naming the path."""
    path = Path(path)
    if path.is_dir():
        info_path = path / _PEFT_INFO
        if info_path.is_file() and (path / "adapter_config.json").is_file():
            try:
                info = json.loads(info_path.read_text())
            except ValueError as e:
                raise ArtifactError(f"{info_path}: not valid JSON ({e})") from None
            if not isinstance(info, dict):
                raise ArtifactError(f"{info_path}: not a JSON object of run info")
            return info
        peft_type = _peft_type(path)
        if peft_type == "LORA":  # saved by PEFT itself: no run info, so eval needs --task, --data-dir, --model
            return {"method": "lora"}
        if peft_type == "VERA":  # PEFT's own VeRA format: verakit reads it after one conversion
            raise ArtifactError(f"{path}: a PEFT VeRA folder, not a verakit artifact; convert it first with "
                                f"`verakit convert from-peft {path} ADAPTER.safetensors`")
        held = artifact_in(path)
        if held is not None:  # RUN_DIR (or a grouped run's adapters/) given where its artifact was meant
            raise ArtifactError(f"{path}: a run folder; pass its artifact, {held}")
        raise ArtifactError(f"{path}: not a verakit LoRA run folder (needs adapter_config.json and {_PEFT_INFO})")
    if not path.is_file():
        raise ArtifactError(f"{path}: no such adapter file or folder")
    fmt = _metadata(path).get("format")
    if fmt == "verakit.adapter":
        from ..fileformat import read_adapter

        # A file from `verakit.save_adapter` holds VeRA vectors whatever run info (if any) it was given.
        return {**read_adapter(path).extra, "method": "vera"}
    if fmt == _TRAINED_FORMAT:
        return json.loads(_metadata(path)["verakit"])
    raise ArtifactError(f"{path}: not a verakit artifact (safetensors metadata format is {fmt!r})")


def artifact_in(folder: Path) -> Path | None:
    """The artifact of a run folder given in its place (RUN_DIR/adapter.safetensors or trained.safetensors, else
    a grouped run's first adapter); None for a PEFT folder (adapter_config.json) or any other."""
    if (folder / "adapter_config.json").is_file():
        return None
    for name in ("adapter.safetensors", "trained.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return next(iter(sorted([*(folder / "adapters").glob("*.safetensors"), *folder.glob("*.safetensors")])), None)


def recorded(info: dict[str, Any], path: str | Path, key: str, given: Any, flags: str) -> Any:
    """`given` when set, else the run info's `key` (`info` read from the artifact at `path`); neither:
    an ArtifactError naming the artifact, what it lacks and the `flags` that supply it."""
    if given is not None:
        return given
    if info.get(key) is not None:
        return info[key]
    raise ArtifactError(f"{path}: no {key} recorded with this artifact (it was not saved by `verakit train`); "
                        f"pass {flags}")


def _peft_type(folder: Path) -> str | None:
    """The `peft_type` of a folder's adapter_config.json (None without a readable one)."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("peft_type") if isinstance(config, dict) else None


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise ArtifactError(f"{path}: not a safetensors file ({e})") from None


def load_artifact(path: str | Path, base: nn.Module, check_base: bool = True) -> nn.Module:
    """`base` (the freshly built pretrained classifier) with the artifact's trained weights applied;
    `check_base=False`: a verakit file loads even when its base-weight samples differ from `base`."""
    path = Path(path)
    method = read_artifact_info(path).get("method")
    if method == "vera":
        from ..fileformat import load_adapter

        return load_adapter(base, path, check_base=check_base)
    if method in PEFT_METHODS:
        import warnings

        from peft import PeftModel
        from safetensors import SafetensorError

        if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            # PEFT would look for it on the hub next, and end in a network error's traceback
            raise ArtifactError(f"{path}: no adapter_model.safetensors in the LoRA folder (its trained weights)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_UNSAVED_PROJECTION)
            try:
                return PeftModel.from_pretrained(base, str(path))
            except (SafetensorError, ValueError) as e:  # a truncated weights file, a malformed adapter_config.json
                raise ArtifactError(f"{path}: cannot load the LoRA folder ({type(e).__name__}: {e})") from None
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    own = dict(base.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ArtifactError(f"{path}: tensors {unknown[:3]} do not exist in {type(base).__name__}")
    for k, t in tensors.items():
        if own[k].shape != t.shape:
            raise ArtifactError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, the model's is {tuple(own[k].shape)}")
    base.load_state_dict(tensors, strict=False)
    return base
