"""The test suite's shared code, one module per purpose (imported as ``support.<module>``: conftest.py puts
``tests/`` on ``sys.path``; ``tests/`` itself is no package).

* ``common``: the embedded default model pair (paths, one cached loader) and the one-line error check;
* ``hf_models``: tiny random Gemma 4 checkpoints built with transformers, the oracle;
* ``untied``: untied heads and prompts for greedy equivalence on those checkpoints;
* ``drafting``: the assistant's drafting steps in minimtp and in transformers, fed the same inputs;
* ``verify_cases``: random ``verify`` calls (hypothesis);
* ``toy_models`` and ``enumeration``: context-dependent toy models and the exact enumeration of one round;
* ``distribution``: the χ² harness of the real engine;
* ``tokenizer``: a character-level tokenizer of a few tokens;
* ``kernel_compile_check``: a script, the ahead-of-time compile of every Triton kernel variant.
"""
