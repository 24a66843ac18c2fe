"""Agreement between a student's and the teacher's answer on constructed pairs: exact match
for short labels, ROUGE-L F1 otherwise (checked against a plain DP), the edges."""

from __future__ import annotations

import random

import pytest

from gateway.adapt.agreement import agreement, lcs_length, rouge_l


def plain_lcs(x: list[str], y: list[str]) -> int:
    """The textbook O(len(x) len(y)) table, as the oracle for the bit-parallel one."""
    row = [0] * (len(y) + 1)
    for a in x:
        previous, row = row, [0]
        for j, b in enumerate(y):
            row.append(previous[j] + 1 if a == b else max(previous[j + 1], row[j]))
    return row[-1]


@pytest.mark.parametrize(
    ("student", "teacher", "expected"),
    [
        ("Earnings beat.", "earnings beat", 1.0),  # case and punctuation normalised
        ("  Refund request!", "refund   request", 1.0),
        ("earnings beat", "earnings miss", 0.0),  # label-like: no partial credit
        ("guidance raised", "guidance raised again", 0.0),
        ("", "", 1.0),
        ("", "earnings beat", 0.0),
    ],
)
def test_short_answers_are_exact_match(student: str, teacher: str, expected: float) -> None:
    assert agreement(student, teacher) == expected


def test_long_answers_score_rouge_l_f1() -> None:
    teacher = "the company raised its full year outlook because orders grew in every region"
    student = "the company raised its outlook because orders grew strongly in every region"
    # 12 and 13 tokens; the LCS leaves out "full year" and "strongly": 11 in common
    precision, recall = 11 / 12, 11 / 13
    assert agreement(student, teacher) == pytest.approx(
        2 * precision * recall / (precision + recall)
    )


def test_a_long_answer_against_a_label_uses_rouge() -> None:
    long = "I think the answer is earnings beat because the profit topped forecasts"
    assert 0 < agreement(long, "earnings beat") < 1


def test_disjoint_and_identical_long_answers() -> None:
    text = "one two three four five six seven eight nine ten"
    assert agreement(text, text.upper()) == 1.0
    assert agreement(text, "alpha beta gamma delta epsilon zeta eta theta iota kappa") == 0.0


def test_only_the_first_256_tokens_count() -> None:
    head = " ".join(f"w{i}" for i in range(256))
    assert rouge_l(head + " tail of the student", head + " and another teacher ending") == 1.0
    assert rouge_l(head[:-5], head) < 1.0


def test_bit_parallel_lcs_matches_the_plain_table() -> None:
    rng = random.Random(0)
    for _ in range(300):
        x = rng.choices("abcdef", k=rng.randint(0, 70))
        y = rng.choices("abcdef", k=rng.randint(0, 70))
        assert lcs_length(x, y) == plain_lcs(x, y), (x, y)


def test_scores_are_symmetric_and_in_range() -> None:
    rng = random.Random(1)
    words = ["the", "a", "profit", "loss", "rose", "fell", "shares", "market", "outlook"]
    for _ in range(200):
        a = " ".join(rng.choices(words, k=rng.randint(1, 30)))
        b = " ".join(rng.choices(words, k=rng.randint(1, 30)))
        score = agreement(a, b)
        assert 0.0 <= score <= 1.0 and score == pytest.approx(agreement(b, a))
