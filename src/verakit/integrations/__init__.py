"""verakit inside other libraries' training loops; each module imports its library (transformers...).

    trainer.py   VeraCallback: verakit adapter files from a plain `transformers.Trainer` run
"""

from __future__ import annotations

__all__: list[str] = []
