"""Errors the library raises for the user to act on."""

from __future__ import annotations


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message names the package
    and the ``pip install`` that adds it (``tvq`` prints it as one error line)."""
