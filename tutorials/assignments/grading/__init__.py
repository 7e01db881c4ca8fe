"""The assignment grader's code, one module per concept (``grade.py`` beside this package is the command line).

``core``: the registry, loading a student file, the time limit, grade() and results.json; ``integrity``: checks read
from the syntax tree; ``stats``: χ² tests; then the tests of each assignment, imported in the order of the reports
(the registration order defines the order of the tests and of the points tables). Beside them, kept as modules
(``grading.holes`` ...): ``holes`` (which library functions are each assignment's holes), ``library`` (grading a
filled library file), ``similarity`` and ``originality`` (copy detection), ``roster`` (a whole class).

The package is the grader the hidden suite registers on (``hidden_suite.register(G)``, G this package): it holds
every name of every module (read-only copies: a module's own state is set on the module, e.g.
``G.distil_drafter.LOSS_VARIANT``).
"""

import types

# The import order is the registration order of the assignments and of their tests (reports, points tables).
# isort: off
from . import core, integrity, stats
from . import spec_sampling, spec_sampling_cases
from . import kv_rollback
from . import paged_attention_kernel, paged_attention_kernel_cases
from . import distil_drafter
from . import holes, library, originality, roster, similarity  # noqa: F401  (grading.holes ...)
# isort: on

MODULES = (core, integrity, stats, spec_sampling, spec_sampling_cases, kv_rollback, paged_attention_kernel,
           paged_attention_kernel_cases, distil_drafter)  # fmt: skip
for _m in MODULES:
    globals().update(
        {k: v for k, v in vars(_m).items() if not k.startswith("__") and not isinstance(v, types.ModuleType)}
    )
del _m
