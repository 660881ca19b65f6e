"""The "what" axis: datastores of chunks, tokens, tags and latents (built once, memory-mapped).

Classes are imported on first use (``from rcd.datastore import TokenDatastore``), so importing a
submodule does not load FAISS.
"""
from importlib import import_module

_EXPORTS = {
    "ChunkDatastore": "rcd.datastore.chunks", "ChunkHits": "rcd.datastore.chunks",
    "TokenDatastore": "rcd.datastore.tokens", "Neighbours": "rcd.datastore.tokens",
    "TagDatastore": "rcd.datastore.tags", "TagHits": "rcd.datastore.tags",
    "LatentDatastore": "rcd.datastore.latent",
    "DatastoreError": "rcd.datastore.storage",
    "IndexSpec": "rcd.datastore.index", "Unit": "rcd.datastore.unit", "Retriever": "rcd.datastore.retrievers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rcd.datastore' has no attribute {name!r}")
