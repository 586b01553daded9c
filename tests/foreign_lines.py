"""What other libraries print and our commands must not show: the test helper of the quiet-screen checks.

``FOREIGN`` matches a line of such chatter: a Python warning (``file.py:12: UserWarning: ...``) or the
``warnings.warn(`` source line printed under one, s3prl's notices about optional upstreams it cannot use,
transformers' progress bars, and what ESPnet's modules print at import (flash-attention, nltk downloads).
``foreign_lines(text)`` lists the lines of ``text`` it matches.
"""

import re

FOREIGN = re.compile(
    r"\w*Warning: |^\s+warnings\.warn\(|is not installed, cannot use \w+ upstream"
    r"|Writing model shards|Loading weights|Support for mismatched key_padding_mask"
    r"|Failed to import Flash Attention|^\[nltk_data\]"
)


def foreign_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if FOREIGN.search(line)]
