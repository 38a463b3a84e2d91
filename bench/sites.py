"""Where interventions read and write activations, which positions they touch, and the hook that always removes itself.

Sites (both viewed per head as ``[batch, seq, heads, dim]``):

* ``heads`` – the input of the attention output projection: the concatenated per-head outputs (ITI's and
  the FLORAIN paper's site).
* ``attn-out`` – the output of that projection split into equal chunks (what the released FLORAIN code used).
* ``residual`` – the residual stream after the decoder layer (CAA's site), one "head" of the hidden size.

Positions: ``"all"`` (KL/CE), ``"last"`` (the last position of every forward call: with a KV cache during
generation that is the last prompt token and then every generated token), or a boolean ``[batch, seq]``
mask (MC scoring: the answer tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, Union

import torch
from torch import nn

from bench.spec import ModelSpec

SITES = ("heads", "attn-out", "residual")
Positions = Union[Literal["all", "last"], torch.Tensor]
Edit = Callable[[torch.Tensor], torch.Tensor]  # [n, heads, dim] -> [n, heads, dim]


def position_mask(positions: Positions, batch: int, seq: int, device: torch.device) -> torch.Tensor | None:
    """Boolean ``[batch, seq]`` mask of the positions to edit (``None`` = all)."""
    if isinstance(positions, str):
        if positions == "all":
            return None
        if positions == "last":
            mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
            mask[:, -1] = True
            return mask
        raise ValueError(f"unknown position policy {positions!r}; valid: 'all', 'last' or a [batch, seq] mask")
    if positions.shape != (batch, seq):
        raise ValueError(f"position mask has shape {tuple(positions.shape)}, the forward call has {(batch, seq)}")
    return positions.to(device=device, dtype=torch.bool)


def edit_tensor(x: torch.Tensor, edit: Edit, n_heads: int, positions: Positions) -> torch.Tensor:
    """Apply ``edit`` to each selected position's own per-head activation; ``x: [batch, seq, heads*dim]``."""
    b, t, width = x.shape
    view = x.reshape(b, t, n_heads, width // n_heads)
    mask = position_mask(positions, b, t, x.device)
    if mask is None:
        return edit(view).reshape(b, t, width).to(x.dtype)
    out = view.clone()
    out[mask] = edit(view[mask]).to(x.dtype)
    return out.reshape(b, t, width)


def site_module(model: nn.Module, spec: ModelSpec, layer: int, site: str) -> nn.Module:
    """The module whose input (``heads``) or output (``attn-out``, ``residual``) is the site's activation."""
    spec.site_shape(site)  # validates the site name
    return spec.decoder_layer(model, layer) if site == "residual" else spec.o_proj(model, layer)


def site_device(model: nn.Module, spec: ModelSpec, layer: int, site: str) -> torch.device:
    """Where the site's activations live: with ``device_map="auto"`` each layer may sit on its own device."""
    module = site_module(model, spec, layer, site)
    return next(module.parameters()).device


@contextmanager
def hooked(model: nn.Module, spec: ModelSpec, layer: int, site: str, edit: Edit,
           positions: Positions = "all") -> Iterator[None]:
    """Install ``edit`` at ``site`` of ``layer`` for the duration of the block; always removed, even on errors."""
    n_heads = spec.site_shape(site)[0]
    if site == "heads":
        def pre_hook(_mod: nn.Module, args: tuple) -> tuple:
            return (edit_tensor(args[0], edit, n_heads, positions), *args[1:])

        handle = site_module(model, spec, layer, site).register_forward_pre_hook(pre_hook)
    else:
        def hook(_mod: nn.Module, _args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
            if isinstance(output, tuple):
                return (edit_tensor(output[0], edit, n_heads, positions), *output[1:])
            return edit_tensor(output, edit, n_heads, positions)

        handle = site_module(model, spec, layer, site).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def recorded(model: nn.Module, spec: ModelSpec, layers: list[int], site: str) -> Iterator[dict[int, torch.Tensor]]:
    """Record the site's activation ``[batch, seq, heads*dim]`` at each layer during the block's forward calls."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        module = site_module(model, spec, layer, site)
        if site == "heads":
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, layer=layer: store.__setitem__(layer, args[0].detach())))
        else:
            handles.append(module.register_forward_hook(
                lambda _m, _a, out, layer=layer: store.__setitem__(
                    layer, (out[0] if isinstance(out, tuple) else out).detach())))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class _Skipped(nn.Module):
    """A decoder layer left out of a resumed pass (:func:`resumed`): returns its input as the layer would return
    its output (a tensor, or a 1-tuple where the model's layers return tuples)."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor | tuple:
        return (hidden_states,) if self.as_tuple else hidden_states


@contextmanager
def layer_input(model: nn.Module, spec: ModelSpec, layer: int) -> Iterator[dict]:
    """Record the hidden states entering decoder ``layer`` during the block's forward call (``"hidden"``) and
    whether the layers return tuples (``"as_tuple"``), for :func:`resumed`."""
    store: dict = {}

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        store["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def post(_m: nn.Module, _args: tuple, out: torch.Tensor | tuple) -> None:
        store["as_tuple"] = isinstance(out, tuple)

    block = spec.decoder_layer(model, layer)
    handles = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def resumed(model: nn.Module, spec: ModelSpec, layer: int, recorded: dict) -> Iterator[None]:
    """Within the block a forward call skips decoder layers ``0..layer-1`` and feeds ``layer`` the hidden states
    :func:`layer_input` recorded. Called with the recorded call's inputs, it computes from ``layer`` on exactly
    what the whole pass would compute when nothing below ``layer`` differs (an edit at ``layer`` or above): the
    layers below are the same computation on the same inputs. For logits only: a skipped layer records no hidden
    states or attentions, and no layer may change its input in place (none of the supported families does)."""
    layers = model.get_submodule(spec.layers_path)
    below = [layers[i] for i in range(layer)]
    stubs = [_Skipped(recorded["as_tuple"]) for _ in below]

    def feed(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (recorded["hidden"], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": recorded["hidden"]}

    handle = layers[layer].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        for i, stub in enumerate(stubs):
            layers[i] = stub
        yield
    finally:
        handle.remove()
        for i, block in enumerate(below):
            layers[i] = block
