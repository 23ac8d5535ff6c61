"""How much of a caption is written in its image: the Text-spotting (T) filter's decision.

Pure functions, no OCR: they take the recognised strings and the caption.

* :func:`content_word_overlap` (default measure ``content_words``): the fraction of the caption's
  distinct content words (lower-cased alphanumeric tokens that are not English stop words) that
  are found among the recognised words. A word is found when it is equal to a recognised word,
  within one edit of one (two for words of 8+ characters; only for words of 4+ characters, so
  "cat" does not match "car"), or (for 5+ characters) inside the recognised text with spaces
  removed, which catches words that OCR ran together ("SUNSETBEACH"). Drop when the score is
  >= the threshold.
* :func:`partial_word_overlap` (measure ``partial``): the same fraction, where a content word is
  also found (4+ characters) when its best partial match in the recognised text (lower-cased
  tokens joined without spaces) scores >= ``PARTIAL_CUTOFF`` (``rapidfuzz.fuzz.partial_ratio``,
  0-100: one wrong character in 7), or when a recognised word of 4+ characters, at least half as
  long, is its start or end with at most one edit in five (clipped at an edge: "eween" for
  "halloween"). Character-level, so words that OCR ran together ("tableandvintagekite"), split
  ("COOK IES") or clipped still count; it finds every word that ``content_words`` finds.
* :func:`fondant_overlap` (measure ``fondant``): Fondant's rule, 1.0 when any recognised word
  (lower-cased) is a substring of the lower-cased caption, else 0.0.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

from spacy.lang.en.stop_words import STOP_WORDS

Measure = Literal["content_words", "partial", "fondant"]  # filters.text_spotting.measure
MEASURES = get_args(Measure)
PARTIAL_CUTOFF = 85
_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """NFKC, lower case, straight apostrophes removed ("dog's" -> "dogs")."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return text.replace("'", "").replace("\u2019", "")


def tokens(text: str) -> list[str]:
    """Alphanumeric word tokens of the normalised text (punctuation and underscores split)."""
    return _TOKEN.findall(normalise(text))


def content_words(caption: str) -> list[str]:
    """Distinct content words of a caption, in order: not stop words, 2+ characters or digits."""
    seen, out = set(), []
    for t in tokens(caption):
        if t in STOP_WORDS or (len(t) < 2 and not t.isdigit()) or t in seen:
            continue
        seen.add(t)
        out.append(t)
    return out


def within_edits(a: str, b: str, k: int) -> bool:
    """Levenshtein distance of a and b is <= k (banded dynamic programme)."""
    if abs(len(a) - len(b)) > k:
        return False
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        if min(cur) > k:
            return False
        prev = cur
    return prev[-1] <= k


def allowed_edits(word: str) -> int:
    return 0 if len(word) < 4 else (1 if len(word) < 8 else 2)


def word_found(word: str, ocr_words: set[str], ocr_joined: str) -> bool:
    if word in ocr_words:
        return True
    k = allowed_edits(word)
    if k and any(within_edits(word, w, k) for w in ocr_words):
        return True
    return len(word) >= 5 and word in ocr_joined


def content_word_overlap(ocr_texts: Sequence[str], caption: str) -> float:
    """Fraction (0..1) of the caption's content words found in the recognised text."""
    words = content_words(caption)
    if not words or not ocr_texts:
        return 0.0
    ocr_tokens = [t for s in ocr_texts for t in tokens(s)]
    ocr_words, joined = set(ocr_tokens), "".join(ocr_tokens)
    return sum(word_found(w, ocr_words, joined) for w in words) / len(words)


def clipped_piece(piece: str, word: str) -> bool:
    """``piece`` (4+ characters, at least half of ``word``) is ``word``'s start or end with at most
    one edit per five characters (a word that OCR clipped at an edge of its box: "eween" for
    "halloween")."""
    from rapidfuzz.distance import Levenshtein

    n = len(piece)
    if not 4 <= n < len(word) <= 2 * n:
        return False
    return any(Levenshtein.distance(piece, part, score_cutoff=n // 5) <= n // 5
               for part in (word[:n], word[-n:]))


def partial_word_overlap(ocr_texts: Sequence[str], caption: str, cutoff: float = PARTIAL_CUTOFF) -> float:
    """Fraction (0..1) of the caption's content words found in the recognised text: as
    :func:`content_word_overlap` finds them, or (4+ characters) by a partial match in the joined
    text scoring >= ``cutoff``, or as a clipped piece (:func:`clipped_piece`)."""
    from rapidfuzz import fuzz  # here: curation.ocr is also imported where only EasyOCR is needed
    words = content_words(caption)
    ocr_tokens = [t for s in ocr_texts for t in tokens(s)]
    if not words or not ocr_tokens:
        return 0.0
    ocr_words, joined = set(ocr_tokens), "".join(ocr_tokens)

    def found(w: str) -> bool:
        if word_found(w, ocr_words, joined):
            return True
        if len(w) < 4:
            return False
        if len(joined) >= len(w) and fuzz.partial_ratio(w, joined, score_cutoff=cutoff):
            return True
        return any(clipped_piece(t, w) for t in ocr_words)

    return sum(found(w) for w in words) / len(words)


def fondant_overlap(ocr_texts: Sequence[str], caption: str) -> float:
    """Fondant's rule: 1.0 when any recognised word (lower-cased) occurs in the caption."""
    cap = (caption or "").lower()
    words = [w for s in ocr_texts for w in s.lower().split() if w]
    return 1.0 if any(w in cap for w in words) else 0.0


@dataclass(frozen=True)
class TextOverlapConfig:
    measure: str = "content_words"
    threshold: float = 0.4

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ValueError(f"filters.text_spotting.measure must be one of {', '.join(MEASURES)}, "
                             f"not {self.measure!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"filters.text_spotting.threshold must be in [0, 1], not {self.threshold}")

    def score(self, ocr_texts: Sequence[str], caption: str) -> float:
        if self.measure == "fondant":
            return fondant_overlap(ocr_texts, caption)
        if self.measure == "partial":
            return partial_word_overlap(ocr_texts, caption)
        return content_word_overlap(ocr_texts, caption)

    def passes(self, score: float) -> bool:
        """Kept when the overlap stays below the threshold (fondant: when nothing matched)."""
        if self.measure == "fondant":
            return score < 1.0
        return score < self.threshold
