"""How a model without a prefill is asked to continue a partial answer (DESIGN A9 resume).

OpenAI Chat Completions and Workers AI document no way to continue an
assistant turn, so their adapters send the partial answer as an
``assistant`` turn followed by ``CONTINUE_INSTRUCTION`` as a ``user`` turn; the
emulator recognises the same turn, so a wrong continuation shows in tests.
"""

from __future__ import annotations

#: The ``user`` turn that asks for the rest of a cut answer.
CONTINUE_INSTRUCTION = (
    "Your previous answer was cut off. Continue it exactly from where it stopped, "
    "without repeating any of it and without any preamble."
)
