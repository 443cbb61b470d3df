"""The package version, in a module of its own so that modules inside verakit (fileformat writes it into
every adapter file) can read it without importing the package root, which imports them."""

__all__ = ["__version__"]

__version__ = "0.1.0"
