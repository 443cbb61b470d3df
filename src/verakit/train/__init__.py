"""Training recipes for VeRA adapters: data loading, metrics, classification and causal-LM loops, reports.

Heavy dependencies (transformers, scikit-learn, scipy, datasets) are imported lazily inside the
submodules that need them, so importing this package stays cheap.
"""
