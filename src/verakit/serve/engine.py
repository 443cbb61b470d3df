"""The serving engine: one base model and tokenizer, an AdapterBank, the adapter directory and a batcher.

What it loads at start (the bank's configuration planned from the adapter directory, the base model) is
`serve/startup.py`'s.

Request handlers validate and tokenize on their own thread and submit jobs; the batcher's worker thread
loads the adapters a batch needs (least recently used ones make room), runs one forward or one
`generate` for every row of the batch whatever its adapter, and resolves each job's future. Everything
that touches the model or the bank runs on that thread or under `Engine._lock`. Prompts are encoded in
each adapter's trained format by `prompts.PromptEncoder`, on the request threads.

Other servers may write the same adapter directory (Ray Serve replicas, hosts sharing a mount). A request
checks that its adapter's file exists, so new uploads are served and deleted adapters refused at once;
before each batch the worker reads the store's generation token and, when it changed, drops every
resident adapter whose file was replaced or removed since it was loaded (the next use reloads it). So a
batch that starts after a write returned never runs the old or deleted adapter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..fileformat import Adapter, AdapterError
from ..inject import attach
from ..prompting import PromptFormat, recorded_prompt_info
from .bank import AdapterBank
from .batcher import Batcher, Job
from .generate import GenResult, GenRow, generate_rows
from .options import ServeOptions
from .prompts import EncodedPrompt, InputError, PromptEncoder
from .startup import load_base, plan_config
from .store import AdapterStore, check_name

__all__ = ["Engine", "UnknownAdapter", "IncompatibleAdapter", "InputError", "UntrainedHead", "ClassifyResult",
           "EncodedPrompt"]

log = logging.getLogger(__name__)
_RUN_INFO_CACHE = 4096  # adapters whose run info encode_inputs keeps (a few KB each)


class UnknownAdapter(LookupError):
    """No adapter of that name on disk or in memory (HTTP 404)."""


class IncompatibleAdapter(AdapterError):
    """An adapter file exists but cannot be served by this bank, or is corrupt (HTTP 409)."""


class UntrainedHead(InputError):
    """Classification without an adapter, but the base model's head was freshly initialised at load time
    (a plain encoder folder such as MiniLM): its answers would be noise (HTTP 409)."""


@dataclass(frozen=True)
class ClassifyResult:
    adapter: str | None
    label_names: list[str]
    labels: list[str]  # predicted label per input (regression: empty)
    probs: list[list[float]]  # per input, over label_names (regression: empty)
    scores: list[float]  # regression heads (one output): the raw prediction per input


@dataclass(frozen=True)
class _Classify:
    adapter: str | None
    encodings: list[dict[str, list[int]]]


@dataclass(frozen=True)
class _Generate:
    adapter: str | None
    rows: list[GenRow]


class Engine:
    """Loads everything named by `options` and serves classify / generate jobs over the bank."""

    def __init__(self, options: ServeOptions, on_batch: Callable[[int, int], None] | None = None) -> None:
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        self.options = options
        self.store = AdapterStore(options.adapters)
        infos = []
        for name in self.store.names():
            try:
                infos.append(self.store.info(name))
            except AdapterError as e:
                log.warning("skipping unreadable adapter while planning the bank: %s", e)
        config, chosen = plan_config(infos, options.rank)
        if len(chosen) < len(infos):
            kept = {i.name for i in chosen}
            refused = [i.name for i in infos if i.name not in kept]
            shown = ", ".join(refused[:10]) + (f" and {len(refused) - 10} more" if len(refused) > 10 else "")
            log.warning("%d of %d adapters do not share the bank's projection/base and will answer 409: %s",
                        len(refused), len(infos), shown)
        self.adapters_planned, self.adapters_refused = len(chosen), len(infos) - len(chosen)
        base = load_base(options, chosen)
        self.task, path, self.tokenizer, model = base.task, base.path, base.tokenizer, base.model
        self.base_name = Path(options.model or path).name  # what `model` names to get the base model
        # Weights the base folder lacks, which transformers initialised at random ("newly initialized").
        self.untrained: tuple[str, ...] = base.untrained
        try:
            attach(model, config)
        except ValueError as e:
            raise AdapterError(f"adapters in {options.adapters} do not fit the model {path}: {e}") from None
        self.bank = AdapterBank(model, options.capacity, check_base=options.check_base)
        self.model = model
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or options.max_input_tokens)
        self.max_input_tokens = min(options.max_input_tokens, self.context)
        self.load_failures = 0
        self.stale_dropped = 0  # resident adapters dropped because their file changed under them
        self._seen = self.store.generation()
        if self.store.exists(self.base_name):  # requests naming it get the base model (uploads under it: 409)
            log.warning("adapter file %s.safetensors has the base model's name %r: requests naming %r are answered "
                        "by the base model, never by that adapter; rename the file to serve it",
                        self.base_name, self.base_name, self.base_name)
        self._signatures: dict[str, tuple[int, int, int] | None] = {}  # resident name -> file at load time
        self._run_infos: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}  # name -> (signature, extra)
        self.resident: frozenset[str] = frozenset()  # snapshot for readers on other threads
        self._on_batch = on_batch
        self._lock = threading.Lock()
        # Encode once here so the fast tokenizer's truncation/padding state is fixed before threads share it.
        self.tokenizer("warm up", "pair", truncation=False)
        self.prompts = PromptEncoder(self.tokenizer, self.max_input_tokens, self.context, self.base_name,
                                     generate=self.task == "generate")
        self.batcher = Batcher(self._run, options.max_batch, options.max_wait_ms / 1000.0)

    # ---------------------------------------------------------------- request side (any thread)

    def adapter_ref(self, name: str | None) -> str | None:
        """None for the base model; else the validated name of an adapter that exists on disk."""
        if name is None or name == self.base_name:
            return None
        check_name(name)
        if not self.store.exists(name):
            raise UnknownAdapter(f"adapter {name!r} not found")
        return name

    def encode_inputs(self, inputs: Sequence[str | Sequence[str]], adapter: str | None = None,
                      ) -> list[dict[str, list[int]]]:
        """Token ids of each input (a text or a pair) for `adapter`. An input longer than the `max_length` the
        adapter was trained and evaluated at (its run info) is cut there as training and `verakit eval` cut
        it (longest first for pairs), so the server answers what the adapter was measured on; the base
        model's inputs are not cut. `--max-input-tokens` applies to the uncut input. An adapter that records
        whether it was trained on text pairs (`text_pair`) refuses inputs of the other shape: one text scored
        by a pair adapter (or a pair joined for a one-text adapter) is an answer to a question it never saw."""
        if not inputs:
            raise InputError("inputs must not be empty")
        if len(inputs) > self.options.max_inputs:
            raise InputError(f"{len(inputs)} inputs exceed the limit of {self.options.max_inputs} per request")
        try:
            extra = self._run_info(adapter) if adapter is not None else {}
        except AdapterError:  # deleted or unreadable: classify() answers that with its own error
            extra = {}
        trained = extra.get("max_length")
        if not isinstance(trained, int) or isinstance(trained, bool) or trained <= 0:
            trained = None
        pairs = extra.get("text_pair")
        out = []
        for i, x in enumerate(inputs):
            a, b = (x, None) if isinstance(x, str) else (x[0], x[1])
            if isinstance(pairs, bool) and pairs != (b is not None):
                want = "[text, text_pair] pairs" if pairs else "single texts"
                raise InputError(f"inputs[{i}]: adapter {adapter!r} was trained on {want} (task "
                                 f"{extra.get('task')!r}); send {'a pair' if pairs else 'one text'}")
            enc = self.tokenizer(a, b, truncation=False)
            n = len(enc["input_ids"])
            if n > self.max_input_tokens:
                raise InputError(f"inputs[{i}] has {n} tokens; the limit is {self.max_input_tokens}")
            if trained is not None and n > trained:
                enc = self.tokenizer(a, b, truncation="longest_first", max_length=trained)
            out.append({k: list(v) for k, v in enc.items()})
        return out

    def _run_info(self, adapter: str) -> dict[str, Any]:
        """`adapter`'s run info (AdapterError for a missing or unreadable file). Kept per file signature: a
        request costs a stat, not a header read, until the file changes."""
        signature = self.store.signature(adapter)
        cached = self._run_infos.get(adapter)
        if signature is not None and cached is not None and cached[0] == signature:
            return cached[1]
        extra = dict(self.store.info(adapter).extra)
        if signature is not None:
            if len(self._run_infos) >= _RUN_INFO_CACHE:  # bounded: names are client-chosen
                self._run_infos.clear()
            self._run_infos[adapter] = (signature, extra)
        return extra

    def prompt_format(self, adapter: str | None) -> PromptFormat:
        """How `adapter` (None: the base model) was trained to read prompts, from its file's run info (the base
        model's: the record a folder written by `verakit merge` carries, else none)."""
        extra: dict[str, Any] = recorded_prompt_info(self.model.config)
        if adapter is not None:
            try:
                extra = self._run_info(adapter)
            except AdapterError as e:  # deleted since adapter_ref, or a header the batch would fail to load too
                if not self.store.exists(adapter):
                    raise UnknownAdapter(f"adapter {adapter!r} not found") from None
                raise IncompatibleAdapter(f"adapter {adapter!r} cannot be served: {e}") from None
        return self.prompts.format(extra)

    def encode_prompt(self, text: str, max_tokens: int, fmt: PromptFormat | None) -> EncodedPrompt:
        """A completion prompt in format `fmt` (None: raw); see `PromptEncoder.encode`."""
        return self.prompts.encode(text, max_tokens, fmt)

    def encode_chat(self, messages: list[dict[str, str]], max_tokens: int, fmt: PromptFormat | None,
                    adapter: str | None) -> EncodedPrompt:
        """A conversation for `adapter`; see `PromptEncoder.encode_chat`."""
        return self.prompts.encode_chat(messages, max_tokens, fmt, adapter)

    def classify(self, adapter: str | None, encodings: list[dict[str, list[int]]]) -> Future:
        if adapter is None and self.untrained:
            raise UntrainedHead(
                f"the base model {self.base_name!r} has no trained classification head ({', '.join(self.untrained)} "
                "were newly initialised at load time, so its answers would be random): name an adapter, or serve "
                "a model folder whose head is trained (e.g. one written by `verakit merge`)")
        return self.batcher.submit(Job("classify", len(encodings), _Classify(adapter, encodings)))

    def generate(self, adapter: str | None, rows: list[GenRow]) -> Future:
        return self.batcher.submit(Job("generate", len(rows), _Generate(adapter, rows)))

    # ---------------------------------------------------------------- admin (threadpool threads)

    def upload(self, name: str, data: bytes, overwrite: bool = False) -> Adapter:
        """Validate and store an adapter file; a resident adapter of that name is reloaded on next use."""
        check_name(name)

        def validate(adapter: Adapter) -> None:
            try:
                self.bank.check(adapter)  # reads the bank's fixed spec only: safe beside the worker
            except AdapterError as e:
                raise IncompatibleAdapter(str(e)) from None

        adapter = self.store.save(name, data, validate, overwrite)
        with self._lock:
            if name in self.bank:
                self.bank.remove(name)
            self.resident = frozenset(self.bank.names())
        return adapter

    def delete(self, name: str) -> None:
        check_name(name)
        with self._lock:
            on_disk, resident = self.store.exists(name), name in self.bank
            if not (on_disk or resident):
                raise UnknownAdapter(f"adapter {name!r} not found")
            if on_disk:
                self.store.delete(name)
            if resident:
                self.bank.remove(name)
                self._signatures.pop(name, None)
            self.resident = frozenset(self.bank.names())

    def bank_stats(self) -> tuple[int, int, int, int, int]:
        return len(self.resident), self.bank.capacity, self.bank.loads, self.bank.evictions, self.load_failures

    def close(self) -> None:
        self.batcher.close()

    # ---------------------------------------------------------------- worker thread

    def _run(self, jobs: list[Job]) -> None:
        with self._lock:
            try:
                self._refresh()
                for chunk in self._chunks(jobs):
                    ready = self._load(chunk)
                    if ready:
                        self._forward(ready)
            finally:
                self.resident = frozenset(self.bank.names())

    def _refresh(self) -> None:
        """Drop resident adapters whose file another writer replaced or deleted. Once per batch: one small
        file read (tens of microseconds, docs/serving.md "One adapter store"), and a stat per resident
        adapter only when the store's generation token moved."""
        token = self.store.generation()
        if token == self._seen:
            return
        self._seen = token  # read before the files: a write after this line moves the token again
        for name in self.bank.names():
            if self.store.signature(name) != self._signatures.get(name):
                self.bank.remove(name)
                self.stale_dropped += 1
        self._signatures = {n: sig for n, sig in self._signatures.items() if n in self.bank}

    def _chunks(self, jobs: list[Job]) -> list[list[Job]]:
        """Split so that no chunk needs more distinct adapters than the bank holds."""
        chunks: list[list[Job]] = [[]]
        names: set[str] = set()
        for j in jobs:
            a = j.payload.adapter
            if a is not None and a not in names and len(names) == self.bank.capacity:
                chunks.append([])
                names = set()
            if a is not None:
                names.add(a)
            chunks[-1].append(j)
        return chunks

    def _load(self, jobs: list[Job]) -> list[Job]:
        """Make every adapter the jobs need resident; fail the jobs whose adapter cannot be loaded."""
        needed = {j.payload.adapter for j in jobs} - {None}
        for n in needed & set(self.bank.names()):
            self.bank.slot(n)  # most recently used now, so loading the others cannot evict it
        failed: dict[str, Exception] = {}
        for n in sorted(needed - set(self.bank.names())):
            try:
                # The signature before the read: if the file is replaced in between, the next refresh sees
                # a mismatch and reloads (one reload too many, never a stale adapter kept).
                signature = self.store.signature(n)
                self.bank.add(n, self.store.read(n))
                self._signatures[n] = signature
            except FileNotFoundError:
                failed[n] = UnknownAdapter(f"adapter {n!r} not found")
            except AdapterError as e:
                self.load_failures += 1
                failed[n] = IncompatibleAdapter(f"adapter {n!r} cannot be served: {e}")
        for j in jobs:
            if j.payload.adapter in failed:
                j.future.set_exception(failed[j.payload.adapter])
        return [j for j in jobs if j.payload.adapter not in failed]

    def _forward(self, jobs: list[Job]) -> None:
        refs = [j.payload.adapter for j in jobs for _ in range(j.rows)]
        if self._on_batch is not None:
            self._on_batch(len(refs), len(set(refs)))
        if jobs[0].kind == "classify":
            self._classify(jobs, refs)
        else:
            self._generate(jobs, refs)

    def _classify(self, jobs: list[Job], refs: list[str | None]) -> None:
        encs = [e for j in jobs for e in j.payload.encodings]
        batch = _pad_right(encs, self.tokenizer.pad_token_id or 0, self.model.device)
        with torch.no_grad():
            logits = self.bank.forward(refs, **batch).logits.float().cpu()  # (B, num_labels)
        start = 0
        for j in jobs:
            part = logits[start : start + j.rows]
            start += j.rows
            names = self._labels_of(j.payload.adapter, part.shape[1])
            if part.shape[1] == 1:
                j.future.set_result(ClassifyResult(j.payload.adapter, names, [], [], part[:, 0].tolist()))
                continue
            probs = part.softmax(dim=-1)
            labels = [names[k] for k in probs.argmax(dim=-1).tolist()]
            j.future.set_result(ClassifyResult(j.payload.adapter, names, labels, probs.tolist(), []))

    def _labels_of(self, adapter: str | None, n: int) -> list[str]:
        labels = self.bank.extra(adapter).get("labels") if adapter is not None else None
        if isinstance(labels, list) and len(labels) == n:
            return [str(x) for x in labels]
        id2label = getattr(self.model.config, "id2label", None) or {}
        return [str(id2label.get(k, f"LABEL_{k}")) for k in range(n)]

    def _generate(self, jobs: list[Job], refs: list[str | None]) -> None:
        rows = [r for j in jobs for r in j.payload.rows]
        with torch.no_grad(), self.bank.rows(refs):
            results: list[GenResult] = generate_rows(self.model, self.tokenizer, rows)
        start = 0
        for j in jobs:
            j.future.set_result(results[start : start + j.rows])
            start += j.rows


def _pad_right(encs: list[dict[str, list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad token lists to one (B, T) batch with an attention mask (pure Python: no tokenizer state)."""
    width = max(len(e["input_ids"]) for e in encs)
    out: dict[str, torch.Tensor] = {}
    for key in encs[0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in encs], dtype=torch.long, device=device)
    if "attention_mask" not in out:
        out["attention_mask"] = torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in encs], dtype=torch.long, device=device
        )
    return out
