"""Text from input lines and servers, made safe to print: control characters are shown, never obeyed.

A ``custom_id`` or an error message may hold escape sequences or newlines; printed raw they could move the
cursor, recolour the terminal, or forge a whole log line (``asyncraft: finished ...``).
"""

from __future__ import annotations

import re

# C0 controls (newline and tab included), DEL, C1 controls (ESC's 8-bit forms), and the Unicode line and
# paragraph separators that some terminals and log viewers break lines on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# What JSON leaves unescaped of those (it escapes the C0 controls itself).
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def safe(text: str) -> str:
    """``text`` on one line, with every control character shown as an escape."""
    return _CONTROL.sub(_escape, text)


def safe_json(text: str) -> str:
    """A JSON document with the characters JSON allows raw but terminals obey written as \\u escapes."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
