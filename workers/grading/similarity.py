"""Text similarity in [0, 1]: fuzzy match (difflib's ratio), sentence BLEU and ROUGE-L, over word tokens."""

from __future__ import annotations

import math
import re
from collections import Counter
from difflib import SequenceMatcher

TOKEN = re.compile(r"\w+|[^\w\s]")
BLEU_ORDER = 4


def tokens(text: str) -> list[str]:
    """Words and punctuation marks, lower-cased: "Hello, world" -> hello , world."""
    return TOKEN.findall(text.lower())


def fuzzy_match(candidate: str, reference: str) -> float:
    """difflib's ratio: twice the matched characters over the total characters of both texts."""
    if not candidate and not reference:
        return 1.0
    return SequenceMatcher(None, candidate, reference, autojunk=False).ratio()


def ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu(candidate: str, reference: str) -> float:
    """Sentence BLEU (Papineni et al. 2002) up to 4-grams with add-one smoothing of the 2- to 4-gram precisions
    (Lin & Och 2004), so that one missing 4-gram does not zero a short answer; times the brevity penalty."""
    hyp, ref = tokens(candidate), tokens(reference)
    if not hyp or not ref:
        return float(hyp == ref)
    log_precision = 0.0
    for n in range(1, BLEU_ORDER + 1):
        hyp_grams, ref_grams = ngrams(hyp, n), ngrams(ref, n)
        matched = sum((hyp_grams & ref_grams).values())
        total = max(len(hyp) - n + 1, 0)
        smoothing = 0 if n == 1 else 1
        if matched + smoothing == 0:
            return 0.0
        log_precision += math.log((matched + smoothing) / (total + smoothing)) / BLEU_ORDER
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_precision)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004): the longest common subsequence of words against both lengths."""
    hyp, ref = tokens(candidate), tokens(reference)
    if not hyp or not ref:
        return float(hyp == ref)
    lcs = longest_common_subsequence(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def longest_common_subsequence(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


METRICS = {"fuzzy_match": fuzzy_match, "bleu": bleu, "rouge_l": rouge_l}
