"""Errors raised by the data layer; each message says what is wrong and how to fix it."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """An OGBench dataset file the DataModule needs is not on disk (nothing is ever downloaded)."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is corrupt, truncated, or does not belong to the requested environment."""


class UnsupportedDomainError(ValueError):
    """The local generator cannot produce this domain (locomotion needs the authors' expert checkpoints)."""
