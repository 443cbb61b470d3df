"""One VeRA adapter per group of rows, trained in one run over mixed batches: `verakit train --group-column`.

    recipe.py       GroupedArgs, groups and their adapter names, GroupedRecipe, train_grouped
    slot_optim.py   SlotAdamW: AdamW with a step count per group
The model becomes slot tables (one row of d, b and head per group) through the core's converter,
`verakit.slot_tables`, the one the serving bank uses too.

Imports the shared layer of verakit.train and the classification recipe (its data, model and head).
Names resolve on first access.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "GroupedArgs": "recipe",
    "GroupError": "recipe",
    "Groups": "recipe",
    "GroupedRecipe": "recipe",
    "adapter_name": "recipe",
    "plan_groups": "recipe",
    "predict_slots": "recipe",
    "train_grouped": "recipe",
    "write_adapter_dir": "recipe",
    "SlotAdamW": "slot_optim",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
