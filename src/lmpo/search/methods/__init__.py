"""Search recipes: each turns search trees into training data and makes an update (one paper, one file). Importing
this package registers every module in :data:`lmpo.registry.SEARCH_RECIPES`."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
