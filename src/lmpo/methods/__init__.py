"""Method components. Importing this package registers every component (explicit imports, no scanning)."""

from lmpo.methods import aggregate  # noqa: F401
from lmpo.methods.advantage import grpo, reinforce_pp, rloo  # noqa: F401
from lmpo.methods.loss import gspo, ppo_clip, reinforce  # noqa: F401
from lmpo.methods.select import dapo  # noqa: F401
from lmpo.methods.presets import PRESETS  # noqa: F401

# Modules that must register at least one component (checked by tests/contracts/test_registry.py).
MODULES = (aggregate, grpo, reinforce_pp, rloo, gspo, ppo_clip, reinforce, dapo)
