"""Test helpers shared by several test modules."""

import torch


def randomize_vectors(model, seed: int = 0, std: float = 0.5) -> None:
    """Give every VeRA vector non-trivial values (b starts at zero, which would hide bugs)."""
    from verakit import vera_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.vera_b.copy_(torch.randn(layer.vera_b.shape, generator=g) * std)
            layer.vera_d.copy_(torch.randn(layer.vera_d.shape, generator=g) * std)


def perturb_weights(model, rel: float, seed: int = 1):
    """`model` with Gaussian noise of `rel` times each parameter's RMS added to every parameter: another
    checkpoint of the same architecture (the base-weight check's test case). Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.float().pow(2).mean().sqrt() * rel)
    return model


def load_experiment(name: str):
    """experiments/NAME.py as module NAME (registered in sys.modules: dataclasses and the experiments'
    imports of one another resolve modules by name; experiments/ itself goes on sys.path when one imports
    a sibling, e.g. glue_grid). The caller pops it from sys.modules when done."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
