"""The fetch policies, one object each behind `FetchPolicy` (base.py), and the table that makes them.

Which policy is on is the config's business (`LayerConfig.policy_enabled`, one switch each, see
layer/config.py for the table of switches and defaults); this table only says which class
implements which name. Order matters for `on_miss`: the neighbours of a file, then the rest of
an executable, then the rest of a small layer join the request being planned in that order.
"""
from __future__ import annotations

from .background import BackgroundFetch
from .base import HOOKS, FetchPolicy, PolicyFactory, PolicyHost
from .executable import ExecutableFetch
from .imports import ImportReadahead, ImportReadaheadPolicy
from .libraries import LibraryReadahead, LibraryReadaheadPolicy, fetch_libraries, resolve_in_layers, shared_worker
from .neighbour import NeighbourFetch
from .prefetch import Prefetch
from .readahead import SequentialReadahead
from .reads_hold_background import ReadsHoldBackground
from .small_layer import SmallLayerFetch

__all__ = [
    "HOOKS", "BackgroundFetch", "ExecutableFetch", "FetchPolicy", "ImportReadahead", "ImportReadaheadPolicy", "LibraryReadahead", "fetch_libraries", "LibraryReadaheadPolicy",
    "PolicyHost",
    "NeighbourFetch", "POLICY_CLASSES", "Prefetch", "ReadsHoldBackground", "SequentialReadahead", "SmallLayerFetch", "resolve_in_layers",
    "shared_worker",
]

POLICY_CLASSES: dict[str, PolicyFactory] = {
    "neighbour": NeighbourFetch,
    "executable": ExecutableFetch,
    "small_layer": SmallLayerFetch,
    "sequential_readahead": SequentialReadahead,
    "library_readahead": LibraryReadaheadPolicy,
    "import_readahead": ImportReadaheadPolicy,
    "reads_hold_background": ReadsHoldBackground,
    "prefetch": Prefetch,
    "background": BackgroundFetch,
}
