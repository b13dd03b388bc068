"""Short, stable hashes of settings: what every output row records as its provenance.

Shared by the engine and the refinement kinds in models/, so it sits at the root of the
package, below both.
"""

from __future__ import annotations

import hashlib
import json


def digest(obj) -> str:
    """A short, stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
