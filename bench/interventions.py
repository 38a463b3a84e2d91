"""The one intervention interface: fit on a training fold, apply over a model as a context manager, save/load.

An :class:`Intervention` is an edit of per-head activations ``[n, heads, dim] -> [n, heads, dim]`` at one
site of one or more layers. Methods register a ``fit`` function (training fold → Intervention) and a ``build``
function (saved config + tensors → edit module); the pure maths lives in ``florain/`` and ``baselines/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, is_dataclass
from importlib.metadata import entry_points
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bench.models import LoadedModel
from bench.options import NoOptions
from bench.options import build as build_options
from bench.options import effective as effective_options
from bench.options import given as given_options
from bench.runs import atomic_directory, check_format
from bench.sites import Positions, hooked, site_device

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


class DamagedInterventionError(ValueError):
    """A saved intervention that cannot be loaded as saved (missing, damaged or edited files)."""


def saved_digest(directory: str | Path) -> str | None:
    """SHA-256 over a saved intervention's files (config.json, then the weights); ``None`` when one is missing."""
    h = hashlib.sha256()
    for name in ("config.json", "intervention.safetensors"):
        path = Path(directory) / name
        if not path.is_file():
            return None
        h.update(path.read_bytes())
    return h.hexdigest()


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
        """Load a saved intervention; a missing, damaged or inconsistent one raises
        :class:`DamagedInterventionError` naming the file and what is wrong."""
        directory = Path(directory)
        cfg_path, weights = directory / "config.json", directory / "intervention.safetensors"
        missing = [p.name for p in (cfg_path, weights) if not p.is_file()]
        if missing:
            raise DamagedInterventionError(f"{directory} is not a saved intervention: {' and '.join(missing)} "
                                           "missing (a saved one holds config.json and intervention.safetensors)")
        try:
            config = json.loads(cfg_path.read_text())
            method, site, layers = config.pop("method"), config.pop("site"), config.pop("layers")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError) as err:
            raise DamagedInterventionError(f"{cfg_path} is damaged: {type(err).__name__}: {err} (it needs the "
                                           "keys method, site and layers)") from None
        prefix = config.pop("prompt_prefix", "")
        policy = config.pop("position_policy", "task")
        check_format(cfg_path, config.pop("format_version", None), FORMAT_VERSION, "saved intervention")
        try:
            tensors = load_file(str(weights))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise DamagedInterventionError(f"{weights} is damaged: {err}") from None
        try:
            build = get_method(method).build
            modules = {}
            for layer in layers:
                own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(layer)}
                module = build(config, own)
                module.load_state_dict(own)
                modules[int(layer)] = module
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise DamagedInterventionError(f"{directory}: its config.json and weights do not fit together "
                                           f"({type(err).__name__}: {str(err)[:300]})") from None
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
    """A registered method: ``fitter(ctx, options)`` returns an Intervention (``None``: no intervention);
    ``build(config, tensors)`` rebuilds a saved one's edit module. ``options`` is the method's options dataclass
    (:mod:`bench.options`): its fields are the only place an option's name, type, default and help are written."""

    name: str
    description: str
    fitter: Callable[..., Intervention | None]
    build: Callable[[dict, dict[str, torch.Tensor]], nn.Module]
    needs_layer: bool = True
    options: type = NoOptions
    #: The recipe's version: bumped when what the method fits changes at the same options (its construction or
    #: a default that is not an option), so a run fitted by an earlier recipe is never reused or resumed as this one.
    version: int = 1

    def parse(self, values: Mapping[str, object], recorded: bool = False):
        """The typed options from ``values`` (names → typed values or text); raises listing what is valid."""
        return build_options(self.options, values, f"--method {self.name}", recorded)

    def given_options(self, values: Mapping[str, object], recorded: bool = False) -> dict:
        """The options ``values`` sets explicitly, checked, under their names (what a run records); ``recorded``:
        values a run folder of an earlier version recorded (their legacy names read, retired ones dropped)."""
        return given_options(self.options, values, f"--method {self.name}", recorded)

    def effective_options(self, values: Mapping[str, object], recorded: bool = False) -> dict:
        """Every option with its default filled in: two runs have the same options when these are equal."""
        return effective_options(self.options, values, f"--method {self.name}", recorded)

    def fit(self, ctx) -> Intervention | None:
        """Fit on ``ctx`` (a :class:`bench.methods.FitContext`) with its options checked and typed."""
        options = ctx.options if isinstance(ctx.options, self.options) else self.parse(ctx.options)
        return self.fitter(ctx, options)


METHODS: dict[str, Method] = {}
#: Entry-point group through which an installed package registers its own methods (see README).
METHOD_ENTRY_POINTS = "florain_bench.methods"


def register(method: Method) -> Method:
    if not is_dataclass(method.options):
        raise TypeError(f"method {method.name!r}: options must be a dataclass, got {method.options!r}")
    known = METHODS.get(method.name)
    if known is not None and known.fitter.__module__ != method.fitter.__module__:
        raise ValueError(f"method {method.name!r} is registered twice: by {known.fitter.__module__} and by "
                         f"{method.fitter.__module__}; give the plugin's method another name")
    METHODS[method.name] = method
    return method


def method(name: str, description: str, build: Callable[[dict, dict[str, torch.Tensor]], nn.Module],
           options: type = NoOptions, needs_layer: bool = True, version: int = 1):
    """Decorator registering ``fit(ctx, options) -> Intervention | None`` as the method ``name``."""
    def deco(fit: Callable[..., Intervention | None]) -> Callable[..., Intervention | None]:
        register(Method(name, description, fit, build, needs_layer, options, version))
        return fit
    return deco


_loaded = False


def load_methods() -> dict[str, Method]:
    """Every registered method: the built-in ones and those of installed plugins (entry points), loaded once."""
    global _loaded
    if not _loaded:
        import bench.methods  # noqa: F401 - registers the built-in methods

        _loaded = True
        for ep in entry_points(group=METHOD_ENTRY_POINTS):
            try:
                ep.load()
            except Exception as err:  # a broken plugin must not take the built-in methods down with it
                log.warning("method plugin %s (%s) failed to load: %s", ep.name, ep.value, err)
    return METHODS


def get_method(name: str) -> Method:
    load_methods()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))} "
                         "(`bench methods list`)")
    return METHODS[name]
