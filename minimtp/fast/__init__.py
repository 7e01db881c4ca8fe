"""The CPU fast path: twins of the reference modules, switched on in one visible place.

``minimtp.fast.FastEngine(target, assistant)`` is :class:`minimtp.Engine` with every twin below (the CLI and
``python -m minimtp.bench`` use it unless ``--reference`` is given); ``minimtp.fast.optimize(target, assistant)``
applies the model twins alone. Both rewrite the models **in place**. Each twin has the reference's call signature
and is proven equal by tests/test_fast.py (top-p: tests/test_fast_top_p.py):

==============================  ===========================================  ==========================================
reference (``minimtp/``)        twin (``minimtp/fast/``)                     proof
==============================  ===========================================  ==========================================
``nn.Linear`` (bfloat16, CPU)   ``onednn.PackedLinear`` (oneDNN-prepacked)   bit-identical outputs
``model.Unembedding``           ``onednn.PackedUnembedding``                 bit-identical logits
the same two, without oneDNN bf16 ``upcast.Upcast{Linear,Unembedding}``          float32-accumulation bound, 8+ rows
``model.Attention``, ``MLP``    ``fused.FusedAttention``, ``FusedMLP``       bit-identical logits, three target families
``model.RMSNorm``               ``fused.FusedRMSNorm``                       bit-identical
``attention.DraftPagedContext``  ``draft_context.DraftRoundContext``          equal draft logits; equal tokens
a float drafter                 ``int8.quantize_assistant_`` (weight-only)   exactness: χ² tests (only acceptance moves)
``sampling.process_logits``     ``top_p.process_logits`` (no full sort)      bit-identical (tests/test_fast_top_p.py)
==============================  ===========================================  ==========================================

Where oneDNN has no bfloat16 matmul (AVX2 CPUs) the upcast twins take the oneDNN ones' place: float32 tiles of the
weight for inputs of 8 or more rows (prefill, long verifications), the reference kernel below
(tests/test_fast_upcast.py).
"""

from minimtp.fast.optimize import FastEngine, optimize, weights_dtype
from minimtp.fast.top_p import process_logits

__all__ = ["FastEngine", "optimize", "process_logits", "weights_dtype"]
