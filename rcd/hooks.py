"""Forward hooks that read hidden states out of any HF causal LM, found generically.

Layers are located by structure, never from a per-model table:

* ``"final"`` — the input of the output embedding (``model.get_output_embeddings()``), i.e. the
  hidden state that feeds the LM head, after the final norm (kNN-LM's key).
* an integer ``i`` — the output of the i-th decoder block (negative counts from the end). Blocks
  are the longest ``nn.ModuleList`` in the model (Llama/Qwen ``model.layers``, GPT-2
  ``transformer.h``, OPT ``model.decoder.layers``).

Hooks attach in ``__enter__`` / :meth:`attach` and detach in ``__exit__`` / :meth:`detach`,
leaving the model exactly as it was.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

Layer = Union[str, int]


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList whose children share one class."""
    best: Optional[nn.ModuleList] = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(f"could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList of blocks")
    return best


def resolve_layer(model: nn.Module, layer: Layer) -> tuple[nn.Module, str]:
    """Module to hook and the side of it to read ('pre' = its input, 'post' = its output)."""
    if layer in ("final", "lm_head", None):
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings; use an integer key layer")
        return head, "pre"
    try:
        idx = int(layer)
    except (TypeError, ValueError):
        raise ValueError(f"key layer must be 'final' or an integer block index, got {layer!r}") from None
    blocks = find_decoder_layers(model)
    if not -len(blocks) <= idx < len(blocks):
        raise ValueError(f"key layer {idx} is out of range: the model has {len(blocks)} blocks")
    return blocks[idx], "post"


def key_layer(datastore) -> Layer:
    """The layer a datastore's keys come from: its manifest's ``layer`` (``final`` when unset)."""
    manifest = getattr(datastore, "manifest", None) or {}
    layer = manifest.get("layer")
    return "final" if layer in (None, "final", "lm_head") else int(layer)


class HiddenCapture:
    """Keeps the hidden states [B, T, H] that pass a layer during the most recent forward."""

    def __init__(self, model: nn.Module, layer: Layer = "final"):
        self.model = model
        self.layer = layer
        self.module, self.side = resolve_layer(model, layer)
        self.hidden: Optional[torch.Tensor] = None
        self._handle = None

    def _pre(self, module, args, kwargs=None):
        x = args[0] if args else next(iter(kwargs.values()))
        self.hidden = x.detach()

    def _post(self, module, args, output):
        x = output[0] if isinstance(output, (tuple, list)) else output
        self.hidden = x.detach()

    def attach(self) -> "HiddenCapture":
        if self._handle is None:
            if self.side == "pre":
                self._handle = self.module.register_forward_pre_hook(self._pre)
            else:
                self._handle = self.module.register_forward_hook(self._post)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.hidden = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> "HiddenCapture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


class KeyEncoder:
    """Hidden states at ``layer`` for every position of a batch, without computing logits.

    For ``layer="final"`` the base model (``model.base_model``) is run alone when its last hidden
    state equals the LM-head input — checked once on a short input — which skips the
    [B, T, vocab] logits; otherwise the full model runs with a :class:`HiddenCapture`.
    """

    def __init__(self, model: nn.Module, layer: Layer = "final"):
        self.model = model
        self.layer = layer
        self.capture = HiddenCapture(model, layer)
        self.use_base = layer in ("final", "lm_head", None) and self._base_matches_head()

    @torch.inference_mode()
    def _base_matches_head(self) -> bool:
        base = getattr(self.model, "base_model", None)
        if base is None or base is self.model:
            return False
        dev = next(self.model.parameters()).device
        ids = torch.arange(1, 9, device=dev).view(1, -1) % max(2, int(self.model.get_output_embeddings().out_features))
        with self.capture:
            self.model(input_ids=ids, use_cache=False)
            want = self.capture.hidden
        try:
            got = base(input_ids=ids, use_cache=False).last_hidden_state
        except Exception:  # a base model with another calling convention: use the capture path
            return False
        return want is not None and got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-4)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.use_base:
            return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                         use_cache=False).last_hidden_state
        with self.capture:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return self.capture.hidden
