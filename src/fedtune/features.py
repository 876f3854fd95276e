"""Feature modules that own a config section of their own; importing this module registers them all.

A feature is an option that composes with the paradigms (differential privacy, attacks for evaluation,
safety, update compression, experiment tracking, ...). Its module declares its section with
`fedtune.registry.register_option` and is imported here, one line each, so that config.py never
names it.
"""

from __future__ import annotations

from . import secagg  # noqa: F401  (secagg.*: secure aggregation, Flower SecAgg+)
from . import tracking  # noqa: F401  (tracking.*: TensorBoard, MLflow, W&B)
from . import privacy  # noqa: F401  (privacy: client-level DP)
from . import attacks  # noqa: F401  (attack: simulated malicious clients; registered after privacy, so it wraps outermost)
from . import safety  # noqa: F401  (the safety section: harmful data, filter, CAI, AdvBench)
from . import compression  # noqa: F401  (compression.kind | ratio | direction)
