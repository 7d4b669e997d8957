"""Library readahead moved to the data path: `stargz_store.layer.policies.libraries`.

A thin re-export, kept only until the daemon's pool calls `Layer.attach_image` instead of wiring
`LibraryReadahead` itself (issue 12); nothing new should import from here.
"""
from ..layer.policies.libraries import LibraryReadahead, resolve_in_layers

__all__ = ["LibraryReadahead", "resolve_in_layers"]
