"""Import Keras and TensorFlow without the optional packages Keras pulls in.

When scikit-learn and matplotlib are installed, importing Keras also imports
them, for its scikit-learn wrappers and its plotting helpers. The stages use
neither through Keras. The two took about 0.8 s of each 3.2 s TensorFlow
import on a 2-core machine, a cost that every trial of a sweep pays again.
"""

from __future__ import annotations

import sys
from types import ModuleType

# Packages that Keras imports only if it can, each guarded by ImportError.
OPTIONAL_FOR_KERAS = ("sklearn", "matplotlib")


def import_keras() -> ModuleType:
    """Import Keras (and TensorFlow, its backend) and return the keras module.

    While Keras is imported, the packages of OPTIONAL_FOR_KERAS that are not
    imported yet are made unimportable. They are importable again afterwards,
    so other code can still use them. Only Keras's scikit-learn wrappers and
    plotting helpers stay disabled in this process.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    hidden = [name for name in OPTIONAL_FOR_KERAS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # an import of `name` now raises ImportError
    try:
        import keras
        import tensorflow  # noqa: F401
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return keras
