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
