"""lmpo: RL post-training of language models on the CPU.

Importing lmpo bounds OpenMP's spin-wait before torch loads its OpenMP runtime (the user's ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` wins; why and what: :mod:`lmpo.engine.threads`).
"""

from lmpo.engine.threads import configure_openmp as _configure_openmp

_configure_openmp()
