"""hyq-fx passes: each module holds one GraphModule → GraphModule rewrite, registered by name.

Every module of this package is imported here, so adding a pass is adding a file.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
