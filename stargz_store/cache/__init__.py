"""On-disk caches of the store: verified chunks by digest, and raw blob ranges."""
from .blob_cache import BlobRangeCache
from .chunk_cache import ChunkCache, MemoryLru
from .files import CacheKeyError

__all__ = ["BlobRangeCache", "CacheKeyError", "ChunkCache", "MemoryLru"]
