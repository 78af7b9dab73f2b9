"""JSON text from files curvscope did not write (checkpoint metadata, a Hugging Face ``config.json``, a report),
parsed with every failure a :class:`ValueError` of one line.

``json.loads`` raises ``RecursionError`` on arrays nested thousands deep and Python's limit on the digits of an
integer (4300) as a ``ValueError`` whose message is a paragraph: :func:`loads` turns both into short
``ValueError`` messages, so a caller needs to catch one type.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``; every failure is a one-line :class:`ValueError` (``nested too deeply``,
    ``an integer of more than 4300 digits``, or the decoder's message)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or the limit on the digits of an integer
        message = str(exc)
        if "digits" in message and "integer" in message:
            raise ValueError("an integer of more than 4300 digits") from None
        raise ValueError(message.splitlines()[0] if message else "invalid JSON") from None
