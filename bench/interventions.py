"""The one intervention interface: fit on a training fold, apply over a model as a context manager, save/load.

An :class:`Intervention` is an edit of per-head activations ``[n, heads, dim] -> [n, heads, dim]`` at one
site of one or more layers. Methods register a ``fit`` function (training fold → Intervention) and a ``build``
function (saved config + tensors → edit module); the pure maths lives in ``florain/`` and ``baselines/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bench.models import LoadedModel
from bench.runs import atomic_directory
from bench.sites import Positions, hooked, site_device

FORMAT_VERSION = 1


@dataclass
class Intervention:
    """A fitted edit at ``site`` of one or more layers (``modules``: layer → edit module).

    ``config`` holds everything needed to rebuild and reproduce it.
    """

    method: str
    site: str
    modules: dict[int, nn.Module]
    config: dict = field(default_factory=dict)
    prompt_prefix: str = ""  # a prompt transform (few-shot examples) prepended before the task's prompt
    position_policy: str = "task"  # "task": the positions the task asks for; "all": every token (weight-like edits)

    @property
    def layers(self) -> list[int]:
        return sorted(self.modules)

    def edit(self, acts: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Transform activations ``[..., heads, dim]`` at ``layer`` (the only layer if there is one)."""
        if layer is None:
            if len(self.modules) != 1:
                raise ValueError(f"this intervention spans layers {self.layers}; say which one")
            layer = self.layers[0]
        return self.modules[layer](acts)

    @contextmanager
    def applied(self, lm: LoadedModel, positions: Positions = "all") -> Iterator[None]:
        """Active on ``lm`` for the duration of the block, at ``positions``; hooks are always removed."""
        with ExitStack() as stack:
            for layer, module in self.modules.items():
                module.to(site_device(lm.model, lm.spec, layer, self.site))  # parameters and buffers; no-op if there
                where = "all" if self.position_policy == "all" else positions
                stack.enter_context(hooked(lm.model, lm.spec, layer, self.site, module, where))
            yield

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``intervention.safetensors`` and ``config.json`` (atomically: a temp dir renamed into place)."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            tensors = {f"{layer}.{k}": v.detach().cpu().contiguous()
                       for layer, module in self.modules.items() for k, v in module.state_dict().items()}
            save_file(tensors, str(tmp / "intervention.safetensors"))
            meta = {"format_version": FORMAT_VERSION, "method": self.method, "site": self.site,
                    "layers": self.layers, "prompt_prefix": self.prompt_prefix,
                    "position_policy": self.position_policy, **self.config}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2, default=str))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Intervention:
        directory = Path(directory)
        cfg_path, weights = directory / "config.json", directory / "intervention.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{directory} is not a saved intervention (needs config.json and intervention.safetensors)")
        config = json.loads(cfg_path.read_text())
        method, site, layers = config.pop("method"), config.pop("site"), config.pop("layers")
        prefix = config.pop("prompt_prefix", "")
        policy = config.pop("position_policy", "task")
        config.pop("format_version", None)
        tensors = load_file(str(weights))
        build = get_method(method).build
        modules = {}
        for layer in layers:
            own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(layer)}
            module = build(config, own)
            module.load_state_dict(own)
            modules[int(layer)] = module
        return cls(method, site, modules, config, prefix, policy)

    def check_model(self, lm: LoadedModel) -> None:
        """Raise if this intervention does not fit ``lm``'s shape at its site and layers."""
        if not self.modules:
            return
        for layer in self.layers:
            lm.spec.check_layer(layer)
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
    options: tuple[str, ...] = ()  # the hyper-parameter names it reads from the run's options
    defaults: Mapping[str, object] = field(default_factory=dict, hash=False)  # values of options not given
    #: The recipe's version: bumped when what the method fits changes at the same options (its construction or
    #: a default that is not an option), so a run fitted by an earlier recipe is never reused or resumed as this one.
    version: int = 1

    def effective_options(self, options: Mapping[str, object]) -> dict:
        """The method's own options with its known defaults filled in (``--rank 32`` equals no ``--rank``; a
        ``None`` value means "not given", as in the fit functions)."""
        given = {k: v for k, v in options.items() if v is not None}
        return {k: v for k, v in {**self.defaults, **given}.items() if k in self.options}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    import bench.methods  # noqa: F401 - registers the built-in methods

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]
