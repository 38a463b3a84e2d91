"""ModelSpec: the few architecture facts the harness relies on, for Llama, Mistral, Qwen2/3 and Gemma families."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: Families whose decoder layers expose ``self_attn.o_proj`` taking the concatenated head outputs.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text")

_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers", "layers")


@dataclass(frozen=True)
class ModelSpec:
    """Layers, heads and where each layer's attention output projection is."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    layers_path: str

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelSpec:
        config = getattr(model.config, "text_config", None) or model.config
        model_type = config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        for path in _LAYER_PATHS:
            try:
                model.get_submodule(path)
            except AttributeError:
                continue
            break
        else:
            raise ValueError(f"could not find the decoder layers of this {model_type} model (tried {_LAYER_PATHS})")
        return cls(
            model_type=model_type,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            layers_path=path,
        )

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if it exists, else raise with the valid range."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range: this model has layers 0..{self.n_layers - 1}")
        return layer

    def o_proj_name(self, layer: int) -> str:
        return f"{self.layers_path}.{self.check_layer(layer)}.self_attn.o_proj"

    def o_proj(self, model: nn.Module, layer: int) -> nn.Module:
        """The attention output projection of ``layer``."""
        return model.get_submodule(self.o_proj_name(layer))

    def decoder_layer(self, model: nn.Module, layer: int) -> nn.Module:
        """The decoder block of ``layer`` (its output is the residual stream after the layer)."""
        return model.get_submodule(f"{self.layers_path}.{self.check_layer(layer)}")

    def site_shape(self, site: str) -> tuple[int, int]:
        """(heads, dim) of the per-head view at ``site``: ``heads`` = o_proj input, ``attn-out`` = its output,
        ``residual`` = the decoder layer's output as one "head" of the hidden size."""
        if site == "residual":
            return 1, self.hidden_size
        if site == "heads":
            return self.n_heads, self.head_dim
        if site == "attn-out":
            if self.hidden_size % self.n_heads:
                raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.n_heads} heads")
            return self.n_heads, self.hidden_size // self.n_heads
        raise ValueError(f"unknown site {site!r}; valid: heads, attn-out, residual")
