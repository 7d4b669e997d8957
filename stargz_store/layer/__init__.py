"""The data path: lazily fetched, verified, cached layer bytes (`Layer`) and how layers are opened."""
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
