"""Text scores of generated answers against reference answers: exact match and ROUGE-L.

Pure Python, no ML imports. Both scores compare normalised text:

- exact match: case-folded, surrounding whitespace stripped, every run of whitespace made one space;
  punctuation counts ("42." is not "42").
- ROUGE-L F1: on word tokens (case-folded runs of letters and digits; whitespace, punctuation and
  underscores separate tokens and are dropped, as in the rouge-score package's default tokenizer,
  but Unicode letters count as letters). The F1 of the longest common subsequence's precision
  (over the prediction's tokens) and recall (over the reference's tokens).
"""

from __future__ import annotations

import re

_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"[^\W_]+")


def normalise(text: str) -> str:
    """The form exact match compares: case-folded, whitespace runs as one space, no outer whitespace."""
    return _WHITESPACE.sub(" ", text.casefold()).strip()


def exact_match(prediction: str, reference: str) -> float:
    return 1.0 if normalise(prediction) == normalise(reference) else 0.0


def tokens(text: str) -> list[str]:
    """Word tokens ROUGE-L counts: case-folded runs of letters and digits."""
    return _WORD.findall(text.casefold())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of a prediction against a reference; 1.0 when both have no tokens, 0.0 when only one has none."""
    predicted, wanted = tokens(prediction), tokens(reference)
    if not predicted or not wanted:
        return 1.0 if predicted == wanted else 0.0
    common = lcs_length(predicted, wanted)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)
