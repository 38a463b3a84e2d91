"""The built-in methods, one module each; importing this package registers them.

A method is a module with an options dataclass (:mod:`bench.options`) and a fit function registered with
:func:`bench.interventions.method`; the pure maths lives in ``florain/`` and ``baselines/``. Methods of other
installed packages register the same way through the ``florain_bench.methods`` entry-point group (README, "Add
your own method"). The registration order below is the row order of tables.
"""

# isort: off
from bench.methods import none, florain, iti, shift, caa, lofit, few_shot  # noqa: F401 - registers them
# isort: on
from bench.methods.context import FitContext, build_shift, probe_layer, shape_config

__all__ = ["FitContext", "build_shift", "probe_layer", "shape_config"]
