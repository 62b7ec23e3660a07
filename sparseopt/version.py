"""The package's version: the one place it is written (pyproject.toml reads it from here; run folders and
exported files record it). A ground-floor module, so that recording it imports nothing above."""

__version__ = "0.1.0"
