"""Controls: what a user steers the target distribution p with, beyond temperature and truncation.

* ``penalties.py``    repetition, presence and frequency penalties;
* ``grammar.py``      JSON Schema, regular expressions, Lark / GBNF grammars (llguidance);
* ``token_healing.py`` the prompt's last token re-spelled by the first generated ones;
* ``logits.py``       one sequence's controls applied to its logits row by row: penalties, then constraints;
* ``stop_strings.py`` stop strings, and the text stream that holds back a possible one.

Each one is a function of the prompt and the tokens a row follows, which is what keeps speculative decoding exact
with them (docs: concepts/controls).
"""

from minimtp.controls.logits import NO_CONTROLS, Constraint, Controls, make_controls
from minimtp.controls.penalties import Penalties, apply_penalties

__all__ = ["NO_CONTROLS", "Constraint", "Controls", "Penalties", "apply_penalties", "make_controls"]
