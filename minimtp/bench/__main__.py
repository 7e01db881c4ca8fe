"""``python -m minimtp.bench [SUBCOMMAND] ...``: the A/B speedup table, or the benchmark a subcommand names."""

from __future__ import annotations

import importlib
import sys

DEFAULT = "minimtp.bench.speedup"  # no subcommand: the A/B speedup table
SUBCOMMANDS = {
    "controls": "minimtp.bench.controls",  # the cost of each decoding control
    "serve": "minimtp.bench.serve",  # the server's throughput and latency by concurrency
    "realsize": "minimtp.bench.realsize",  # random-weight checkpoints of the real sizes (and their sizes on paper)
    "compare": "minimtp.bench.compare",  # minimtp and transformers side by side on one checkpoint
    "longctx": "minimtp.bench.longctx",  # plain and speculative per-token cost by context length
}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark ``argv`` asks for (default: the command line) and return its exit status.

    ``python -m minimtp.bench NAME ...`` runs ``SUBCOMMANDS[NAME]`` with the rest of the arguments; anything else
    goes to the A/B speedup table. Only the chosen module is imported (``serve`` needs the web server's packages,
    the others do not)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        module = SUBCOMMANDS[argv[0]]
        argv = argv[1:]
    else:
        module = DEFAULT
    return importlib.import_module(module).main(argv)


if __name__ == "__main__":
    sys.exit(main())
