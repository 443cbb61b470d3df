"""Serving many VeRA adapters over one base model: slot tables (AdapterBank), batching engine, HTTP app.

`import verakit.serve` needs torch only; the engine and HTTP app import transformers and fastapi lazily
(`verakit.serve.engine`, `verakit.serve.app`).
"""

from .bank import AdapterBank, AdapterRef

__all__ = ["AdapterBank", "AdapterRef"]
