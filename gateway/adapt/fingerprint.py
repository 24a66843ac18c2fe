"""Template fingerprints: a 16-hex-digit hash that is equal for requests made from one
template (a program wrapping changing items in a fixed prompt) and differs across
templates. The gateway computes one for every request, so it must stay cheap (~10 us on
the project's 2-core machines; bench/adapt/detect.py measures it).

How the template is read (`template` returns it, `fingerprint` hashes it with blake2b):

- System messages and every turn before the last user message are kept whole; so is
  anything after it (an assistant prefill). A completions prompt counts as one user
  message, so the same text fingerprints alike on both endpoints.
- The last user message is split into lines, empty lines dropped. A line that starts with
  a short label ("Headline:", "Review:", "Text:": at most 4 words, then a colon within
  the first 64 characters, followed by a space or the line's end) is reduced to its
  label. Otherwise the first line (the instruction) is kept whole and a later line
  becomes `*`, unless it follows a line ending in a colon (it continues that field) or
  another `*`, so an item of any number of lines reads the same.
- A message of one line keeps the part before its first ": " ("Translate to French: ..."
  -> "translate to french:"); a line without one is kept whole, so bare questions spread
  over as many fingerprints as there are questions.
- Everywhere: lowercase, whitespace collapsed, runs of digits -> `#`, quoted spans ("...",
  “...”, `...`, and '...' standing apart from words) -> `"…"`.

Limits (tests/gateway/adapt/test_fingerprint.py shows each):
- Item-first templates ("{document}\n\nSummarise the text above.") keep the item as the
  instruction: every request gets its own fingerprint and the template is never seen.
  So does an item inside the instruction line (unquoted) or in the system message
  (retrieved context).
- An item line that happens to start with a short "word:" ("Subject: ...", "Note: ...")
  reads as a label, so such items split one template over a few fingerprints.
- Bare questions that differ only in numbers or quoted spans ("What is 7 + 5?") share
  one; so do templates that differ only in numbers, or only in what follows a label.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

# A short label opening a line: 1-4 words (letters first; digits and a few joiners
# allowed), then a colon that ends the line or is followed by a space. "http://" and
# "10:30" are not labels.
_LABEL = re.compile(r"\s*([^\W\d_][\w'&/()-]*(?:[ \t]+[\w'&/()-]+){0,3})[ \t]*:(?:\s|$)")
_QUOTED = re.compile(r"\"[^\"\n]*\"|“[^”\n]*”|`[^`\n]*`|\B'[^'\n]*'\B")  # \B': not an apostrophe
_DIGITS = re.compile(r"\d+")
_LABEL_CHARS = 64  # a label's colon comes this early
_MASK = '"…"'
_STAR = "*"


def _norm(text: str) -> str:
    """Lowercased, quoted spans and digit runs masked, whitespace collapsed."""
    text = text.lower()
    if '"' in text or "'" in text or "`" in text or "“" in text:  # cheaper than the scan
        text = _QUOTED.sub(_MASK, text)
    return " ".join(_DIGITS.sub("#", text).split())


def _label(line: str) -> str | None:
    if line.find(":", 0, _LABEL_CHARS) < 0:  # most item lines: no regex needed
        return None
    match = _LABEL.match(line)
    return _norm(match.group(1)) + ":" if match else None


def _reduce(message: str) -> str:
    """The template part of the last user message (see the module docstring)."""
    lines = [line for line in message.splitlines() if line and not line.isspace()]
    if not lines:
        return ""
    if len(lines) == 1:
        line = _norm(lines[0])
        head, sep, _ = line.partition(": ")
        return head + ":" if sep else line
    out: list[str] = []
    for i, line in enumerate(lines):
        label = _label(line)
        if label is not None:
            out.append(label)
        elif i == 0:
            out.append(_norm(line))
        elif out[-1] != _STAR and not out[-1].endswith(":"):
            out.append(_STAR)  # after a label (or "...:") a line continues its field
    return "\n".join(out)


def _content(message: Mapping[str, object]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: their text, in order
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def template(request: str | Sequence[Mapping[str, str]]) -> str:
    """The normalised template text of a completions prompt or a list of chat messages."""
    if isinstance(request, str):
        return "user: " + _reduce(request)
    last = max((i for i, m in enumerate(request) if m.get("role") == "user"), default=-1)
    parts = []
    for i, message in enumerate(request):
        text = _content(message)
        body = _reduce(text) if i == last else _norm(text)
        parts.append(f"{message.get('role', '')}: {body}")
    return "\n".join(parts)


def fingerprint(request: str | Sequence[Mapping[str, str]]) -> str:
    """16 hex digits: blake2b (8 bytes) of `template(request)`."""
    return hashlib.blake2b(template(request).encode(), digest_size=8).hexdigest()
