"""Feature modules that own a config section of their own; importing this module registers them all.

A feature is an option that composes with the paradigms (differential privacy, attacks for evaluation,
safety, update compression, experiment tracking, ...). Its module declares its section with
`fedtune.registry.register_option` and is imported here, one line each, so that config.py never
names it.
"""

from __future__ import annotations

from . import compression  # noqa: F401  (compression.kind | ratio | direction)
