"""The federated fine-tuning frameworks, one module each; importing this package registers them all.

See `fedtune.registry` for what a paradigm declares. To add one: write its module (its
client app, its round loop, one `registry.register` call) and import it here.
"""

from . import fedpeft, kd, split  # noqa: F401  (each module registers its paradigms)
from . import fedbpt, fedkseed, offsite  # noqa: F401  (black-box; zeroth-order; gray-box)
from . import feddpo  # noqa: F401  (federated DPO on preference pairs)
from ..registry import Paradigm, get, names, register, sections

__all__ = ["Paradigm", "get", "names", "register", "sections"]
