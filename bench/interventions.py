"""The one intervention interface: fit on a training fold, apply over a model as a context manager, save/load.

An :class:`Intervention` is an edit of per-head activations ``[n, heads, dim] -> [n, heads, dim]`` at one
site of one layer. Methods register a ``fit`` function (training fold → Intervention) and a ``build``
function (saved config + tensors → edit module); the pure maths lives in ``florain/`` and ``baselines/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bench.models import LoadedModel
from bench.sites import Positions, hooked

FORMAT_VERSION = 1


@dataclass
class Intervention:
    """A fitted edit at ``site`` of ``layer``. ``config`` holds everything needed to rebuild and reproduce it."""

    method: str
    layer: int
    site: str
    module: nn.Module
    config: dict = field(default_factory=dict)

    def edit(self, acts: torch.Tensor) -> torch.Tensor:
        """Transform activations ``[..., heads, dim]``."""
        return self.module(acts)

    @contextmanager
    def applied(self, lm: LoadedModel, positions: Positions = "all") -> Iterator[None]:
        """Active on ``lm`` for the duration of the block, at ``positions``; hooks are always removed."""
        param = next(self.module.parameters(), None)
        device = next(lm.model.parameters()).device
        if param is not None and param.device != device:
            self.module.to(device)
        with hooked(lm.model, lm.spec, self.layer, self.site, self.edit, positions):
            yield

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``intervention.safetensors`` and ``config.json`` (atomically: a temp dir renamed into place)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
            save_file(tensors, str(tmp / "intervention.safetensors"))
            meta = {"format_version": FORMAT_VERSION, "method": self.method, "layer": self.layer, "site": self.site,
                    **self.config}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2, default=str))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Intervention:
        directory = Path(directory)
        cfg_path, weights = directory / "config.json", directory / "intervention.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{directory} is not a saved intervention (needs config.json and intervention.safetensors)")
        config = json.loads(cfg_path.read_text())
        method = config.pop("method")
        layer, site = config.pop("layer"), config.pop("site")
        config.pop("format_version", None)
        tensors = load_file(str(weights))
        module = get_method(method).build(config, tensors)
        module.load_state_dict(tensors)
        return cls(method, layer, site, module, config)

    def check_model(self, lm: LoadedModel) -> None:
        """Raise if this intervention does not fit ``lm``'s shape at its site and layer."""
        lm.spec.check_layer(self.layer)
        heads, dim = lm.spec.site_shape(self.site)
        want = self.config.get("heads"), self.config.get("head_dim")
        if want != (heads, dim):
            raise ValueError(f"intervention expects {want[0]} heads × {want[1]} dims at {self.site}, "
                             f"the model has {heads} × {dim}")


@dataclass(frozen=True)
class Method:
    """A registered method. ``fit(ctx)`` returns an Intervention, or ``None`` for no intervention."""

    name: str
    description: str
    fit: Callable[..., Intervention | None]
    build: Callable[[dict, dict[str, torch.Tensor]], nn.Module]
    needs_layer: bool = True


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    import bench.methods  # noqa: F401 - registers the built-in methods

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]
