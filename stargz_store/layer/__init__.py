"""The data path: lazily fetched, verified, cached layer bytes (`Layer`) and how layers are opened.

`reader.py` is the verified chunk reader; `policies/` the fetch policies, one object each;
`config.py` the one table of their defaults; `trees.py` the GC policy for built TOC trees.
"""
from .config import LayerConfig
from .errors import LayerReadError
from .layer import Layer
from .resolver import BlobSource, LayerResolver, RegistryBlobSource, TailCachedReadAt
from .sources import FileBlobSource
from .trees import release_frozen

__all__ = [
    "BlobSource", "FileBlobSource", "Layer", "LayerConfig", "LayerReadError", "LayerResolver",
    "RegistryBlobSource", "TailCachedReadAt", "release_frozen",
]
