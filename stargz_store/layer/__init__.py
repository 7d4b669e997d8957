"""The data path: lazily fetched, verified, cached layer bytes (`Layer`) and how layers are opened."""
from .config import LayerConfig
from .errors import LayerReadError
from .layer import Layer
from .resolver import BlobSource, LayerResolver, RegistryBlobSource, TailCachedReadAt
from .sources import FileBlobSource

__all__ = [
    "BlobSource", "FileBlobSource", "Layer", "LayerConfig", "LayerReadError", "LayerResolver",
    "RegistryBlobSource", "TailCachedReadAt",
]
