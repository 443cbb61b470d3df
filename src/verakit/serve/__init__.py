"""Serving many VeRA adapters over one base model: slot tables (AdapterBank), batching engine, HTTP app.

`import verakit.serve` needs torch only; the engine (and what it loads at start, `verakit.serve.startup`),
the HTTP app and the server process import transformers, fastapi and uvicorn lazily
(`verakit.serve.engine`, `verakit.serve.app`, `verakit.serve.server`).
"""

from .bank import AdapterBank, AdapterRef

__all__ = ["AdapterBank", "AdapterRef"]
