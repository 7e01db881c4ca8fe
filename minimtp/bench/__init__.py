"""The benchmarks, ``python -m minimtp.bench [SUBCOMMAND] ...``: one module per subcommand.

* no subcommand (``speedup.py``): does speculative decoding pay? The A/B table with and without the assistant,
  Leviathan et al.'s speedup model against it, the plots, and ``--compare-transformers``;
* ``controls`` (``controls.py``): what each decoding control costs per token, plain and speculative;
* ``serve`` (``serve.py``): the server under load, throughput and latency by concurrency;
* ``realsize`` (``realsize.py``): random-weight checkpoints of the real Gemma 4 sizes, and the sizes on paper;
* ``compare`` (``compare.py``): minimtp and transformers side by side on one checkpoint;
* ``longctx`` (``longctx.py``): how the per-token cost of plain and speculative decoding grows with context.

``timing.py`` holds what they share (latency of a forward and of a drafting step, loading the pair from the flags);
``__main__.py`` dispatches the command line.
"""
