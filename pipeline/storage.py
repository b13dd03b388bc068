"""`segflow.pipeline.storage` is `segflow.storage` (see there): one module object, two names.

The storage layer moved to the package root so that models/ can read checkpoints through
it without importing the engine. This name stays for the engine's modules and for users;
it is the very same module (not a copy of its names), so patching one patches the other.
"""

import sys

from segflow import storage as _storage

sys.modules[__name__] = _storage
