"""Text views of the improved-CLIP recipe (SPEC section 5), offline and seeded.

Weak view: stopword removal with probability ``weak.stopwords_p`` (the whole caption). Strong
view: stopword removal with ``strong.stopwords_p``, then at most one EDA operation ("Easy Data
Augmentation", Wei & Zou 2019), drawn with the probabilities in ``strong.ops``:

- ``synonym``: replace ``synonym_n`` distinct non-stopwords by a synonym from the offline
  thesaurus (every occurrence of the word, as EDA does);
- ``swap``: swap two random words, ``swap_n`` times;
- ``delete``: delete each word with probability ``delete_p`` (at least one word is kept).

If the op probabilities sum to less than 1, the rest is "no op". Stopwords are spaCy's English
list (``spacy.lang.en.stop_words.STOP_WORDS``; no model is loaded). Words are whitespace tokens;
leading/trailing punctuation stays attached to its word and is ignored when matching stopwords
and synonyms. An augmentation that would leave no word returns the input unchanged.

All randomness comes from the ``random.Random`` passed in, never from the global RNG, so a view
is a pure function of (caption, config, rng state).
"""

from __future__ import annotations

import random
import string
from typing import Callable, Mapping, Sequence

from training.settings import TextViewsConfig, section_view

__all__ = [
    "EDA_OPS",
    "TextAugmenter",
    "random_deletion",
    "random_swap",
    "remove_stopwords",
    "synonym_replacement",
    "stopwords",
]

EDA_OPS = ("synonym", "swap", "delete")
_PUNCT = string.punctuation + "“”‘’«»…"


def stopwords() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(w.lower() for w in STOP_WORDS)


def _core(token: str) -> str:
    """The word inside a token, lower-cased, without surrounding punctuation."""
    return token.strip(_PUNCT).lower()


def _replace_core(token: str, new: str) -> str:
    core = token.strip(_PUNCT)
    start = token.find(core)
    return token[:start] + new + token[start + len(core):]


def remove_stopwords(words: Sequence[str], stop: frozenset[str]) -> list[str]:
    """``words`` without stopwords; the input unchanged when nothing but stopwords is left."""
    kept = [w for w in words if _core(w) not in stop]
    return kept if any(_core(w) for w in kept) else list(words)


def random_swap(words: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """Swap two distinct random positions, ``n`` times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability ``p``; keep one random word if all would go."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept if kept else [words[rng.randrange(len(words))]]


def synonym_replacement(words: Sequence[str], n: int, rng: random.Random,
                        synonyms: Callable[[str], Sequence[str]],
                        stop: frozenset[str] = frozenset()) -> list[str]:
    """Replace up to ``n`` distinct non-stopwords (all their occurrences) by a random synonym."""
    out = list(words)
    candidates = sorted({c for c in map(_core, out) if c.isalpha() and c not in stop})
    rng.shuffle(candidates)
    replaced = 0
    for word in candidates:
        if replaced >= n:
            break
        options = list(synonyms(word))
        if not options:
            continue
        new = rng.choice(options)
        out = [_replace_core(t, new) if _core(t) == word else t for t in out]
        replaced += 1
    return out


class TextAugmenter:
    """Weak and strong text views from the ``views.text`` config section (the typed
    :class:`training.settings.TextViewsConfig`; a partial mapping is merged over
    ``configs/train/improved.yaml``'s).

    ``thesaurus``: an object with ``synonyms(word) -> list[str]``; by default the one configured
    in ``text.synonyms`` (loaded lazily, only when the synonym op has a non-zero probability).
    """

    def __init__(self, cfg: TextViewsConfig | Mapping, thesaurus=None):
        cfg = section_view(TextViewsConfig, "improved", "views.text", cfg)
        strong = cfg.strong
        self.weak_stopwords_p = _prob(cfg.weak.stopwords_p, "text.weak.stopwords_p")
        self.strong_stopwords_p = _prob(strong.stopwords_p, "text.strong.stopwords_p")
        self.op_probs = [(op, _prob(getattr(strong.ops, op), f"text.strong.ops.{op}"))
                         for op in EDA_OPS]
        if sum(p for _, p in self.op_probs) > 1.0 + 1e-9:
            raise ValueError("text.strong.ops probabilities sum to more than 1: "
                             f"{dict(self.op_probs)}")
        self.synonym_n = _count(strong.synonym_n, "text.strong.synonym_n")
        self.swap_n = _count(strong.swap_n, "text.strong.swap_n")
        self.delete_p = _prob(strong.delete_p, "text.strong.delete_p")
        self.synonyms_cfg = cfg.synonyms
        self._thesaurus = thesaurus
        self._own_thesaurus = thesaurus is None
        self.stop = stopwords()
        if thesaurus is None and dict(self.op_probs)["synonym"] > 0:
            self.thesaurus  # fail early (clear error) when the configured source is missing

    @property
    def thesaurus(self):
        if self._thesaurus is None:
            from training.augment.thesaurus import load_thesaurus

            self._thesaurus = load_thesaurus(self.synonyms_cfg)
        return self._thesaurus

    def __getstate__(self):
        # Shipped to Ray workers: a configured thesaurus is reloaded there (once per process).
        state = dict(self.__dict__)
        if self._own_thesaurus:
            state["_thesaurus"] = None
        return state

    def _maybe_remove_stopwords(self, words: list[str], p: float, rng: random.Random):
        return remove_stopwords(words, self.stop) if rng.random() < p else words

    def weak(self, caption: str, rng: random.Random) -> str:
        words = caption.split()
        return " ".join(self._maybe_remove_stopwords(words, self.weak_stopwords_p, rng))

    def pick_op(self, rng: random.Random) -> str | None:
        u, acc = rng.random(), 0.0
        for op, p in self.op_probs:
            acc += p
            if u < acc:
                return op
        return None

    def strong(self, caption: str, rng: random.Random) -> str:
        words = self._maybe_remove_stopwords(caption.split(), self.strong_stopwords_p, rng)
        op = self.pick_op(rng)
        if op == "synonym":
            words = synonym_replacement(words, self.synonym_n, rng, self.thesaurus.synonyms,
                                        self.stop)
        elif op == "swap":
            words = random_swap(words, self.swap_n, rng)
        elif op == "delete":
            words = random_deletion(words, self.delete_p, rng)
        return " ".join(words) if words else caption

    def views(self, caption: str, rng: random.Random, num_strong: int = 2) -> tuple[str, list[str]]:
        """(weak view, [strong views]) of one caption."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        return self.weak(caption, rng), [self.strong(caption, rng) for _ in range(num_strong)]


def _prob(value, name: str) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return p


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value
