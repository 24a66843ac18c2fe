"""How far a student's answer agrees with the teacher's, in [0, 1], for the audits the
degradation detector watches.

The rule: when both answers are short and label-like (at most 8 words once normalised
as the tasks score them: lowercase, punctuation dropped), agreement is exact match of the
normalised answers, 1.0 or 0.0. Otherwise it is ROUGE-L F1 (Lin 2004) over lowercased
word tokens (runs of letters and digits), the first 256 tokens of each: with L the
length of their longest common subsequence, P = L / len(student), R = L / len(teacher),
F1 = 2PR / (P + R). Two empty answers agree (1.0); one empty answer does not (0.0).
"""

from __future__ import annotations

import re

from models.tasks.base import normalise

LABEL_WORDS = 8
MAX_TOKENS = 256
_WORD = re.compile(r"[^\W_]+")


def agreement(student: str, teacher: str) -> float:
    a, b = normalise(student), normalise(teacher)
    if len(a.split()) <= LABEL_WORDS and len(b.split()) <= LABEL_WORDS:
        return float(a == b)
    return rouge_l(student, teacher)


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())[:MAX_TOKENS]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of the two texts' first 256 word tokens."""
    x, y = tokens(candidate), tokens(reference)
    if not x or not y:
        return float(not x and not y)
    common = lcs_length(x, y)
    if common == 0:
        return 0.0
    precision, recall = common / len(x), common / len(y)
    return 2 * precision * recall / (precision + recall)


def lcs_length(x: list[str], y: list[str]) -> int:
    """Length of the longest common subsequence: the textbook DP, a row at a time, with
    the row's steps held as the bits of one integer (Allison and Dix 1986; the update of
    Hyyrö 2004, "Bit-parallel LCS-length computation revisited"), so 256 x 256 tokens
    take 256 big-integer steps instead of 65,536 Python ones."""
    positions: dict[str, int] = {}
    for i, token in enumerate(x):
        positions[token] = positions.get(token, 0) | (1 << i)
    full = (1 << len(x)) - 1
    row = full  # bit i clear: the LCS of x[: i + 1] and y so far gained a match there
    for token in y:
        match = row & positions.get(token, 0)
        row = ((row + match) | (row - match)) & full
    return len(x) - row.bit_count()
