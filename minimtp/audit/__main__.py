"""``python -m minimtp.audit SUBCOMMAND ...``: minimtp as the oracle for other MTP implementations (docs: guides/audit).

expected   the acceptance a correct engine must report on a workload, exactly (expected.py)
metrics    an engine's Prometheus counters against it, with error bars and likely causes (metrics.py)
sampling   a seeded-sample χ² test of any OpenAI-compatible endpoint against the exact distribution (sampling.py)
golden     reference traces (hidden states, logits, drafts, centroids, KV positions) to diff against (golden.py)
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "expected": "minimtp.audit.expected",
    "metrics": "minimtp.audit.metrics",
    "sampling": "minimtp.audit.sampling",
    "golden": "minimtp.audit.golden",
}


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand ``argv`` names (default: the command line); its exit status. ``--help``: the usage on
    standard output; no subcommand or an unknown one: the usage and one error line on standard error, status 2."""
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python -m minimtp.audit {{{','.join(SUBCOMMANDS)}}} ...\n\n{__doc__.strip()}"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        print(usage, file=sys.stderr)
        got = f"unknown subcommand {argv[0]!r}" if argv else "no subcommand"
        print(f"error: {got}: expected one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
