"""The transformers 5.23.0 fixes minimtp needs to use transformers as an oracle (tests, ``bench --compare``).

``Gemma4TextConfig.kv_sharing_modes`` (``models/gemma4/configuration_gemma4.py``) raises for a fully shared config, so
``Gemma4AssistantForCausalLM`` cannot be built, and it marks no "store" layer when nothing is shared (26B/31B
targets), so assisted decoding fails. The patched property: all ``"reuse"`` when every layer is shared; with no
sharing, ``"store"`` on the last layer of each type; otherwise the original. Target outputs are unchanged.
"""

from __future__ import annotations


def patch_transformers() -> None:
    """Apply the kv_sharing_modes fix (idempotent)."""
    from transformers.models.gemma4 import configuration_gemma4 as cg

    cls = cg.Gemma4TextConfig
    if getattr(cls, "_minimtp_patched", False):
        return
    original = cls.kv_sharing_modes

    def kv_sharing_modes(self):
        n, L = self.num_kv_shared_layers, self.num_hidden_layers
        if n is not None and n >= L:
            return ["reuse"] * L
        if not n:
            modes = [None] * L
            for t in set(self.layer_types):
                modes[max(i for i, lt in enumerate(self.layer_types) if lt == t)] = "store"
            return modes
        return original.fget(self)

    cls.kv_sharing_modes = property(kv_sharing_modes)
    cls._minimtp_patched = True
