"""Offline synonym sources for text augmentation (no network, no downloads).

Two sources, both from Debian packages:

- ``wordnet``: Princeton WordNet 3.0 from ``wordnet-base`` (``/usr/share/wordnet``), read with
  NLTK's own :class:`~nltk.corpus.reader.wordnet.WordNetCorpusReader`. The Debian database lacks
  the ``lexnames`` file the reader expects (the 45 lexicographer file names, fixed since WordNet
  2.0), so the reader is given that standard list from memory; every other file is the package's.
  NLTK's ``wordnet`` corpus download is WordNet 3.0 too, so the synonyms are the same as
  ``nltk.corpus.wordnet`` (what EDA and the paper's code use).
- ``mythes``: LibreOffice's English thesaurus from ``mythes-en-us``
  (``/usr/share/mythes/th_en_US_v2.dat`` + ``.idx``, plain text). Only plain synonyms are used;
  entries marked ``(generic term)``, ``(similar term)``, ``(related term)`` or ``(antonym)`` are
  skipped.

``load_thesaurus({"source": "wordnet", "path": None})`` returns a cached :class:`Thesaurus`
(one per process and source/path); ``path: null`` means the Debian default location. A missing
source raises :class:`ThesaurusNotFoundError` naming the Debian package to install.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from pathlib import Path
from typing import Mapping

from training.settings import SynonymsConfig, section_view

__all__ = [
    "DEFAULT_PATHS",
    "DEBIAN_PACKAGES",
    "MythesThesaurus",
    "Thesaurus",
    "ThesaurusNotFoundError",
    "WordNetThesaurus",
    "load_thesaurus",
]

DEFAULT_PATHS = {
    "wordnet": "/usr/share/wordnet",
    "mythes": "/usr/share/mythes/th_en_US_v2.dat",
}
DEBIAN_PACKAGES = {"wordnet": "wordnet-base", "mythes": "mythes-en-us"}

# WordNet's lexicographer files (wndb(5WN) "lexnames"): number, name, syntactic category.
WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv",
                 "index.noun", "index.verb", "index.adj", "index.adv")


class ThesaurusNotFoundError(FileNotFoundError):
    """The configured synonym source is not installed (or its path is wrong)."""


class Thesaurus:
    """``synonyms(word)``: synonyms of ``word`` (lower-cased lookup), deterministic order, no
    duplicates, never the word itself; multi-word synonyms contain spaces."""

    source = ""

    def synonyms(self, word: str) -> list[str]:
        key = word.strip().lower()
        if not key:
            return []
        return list(self._cached(key))

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per process (load_thesaurus)
    def _cached(self, key: str) -> tuple[str, ...]:
        out: list[str] = []
        seen = {key}
        for term in self._lookup(key):
            term = " ".join(term.replace("_", " ").split())
            if term and term.lower() not in seen:
                seen.add(term.lower())
                out.append(term)
        return tuple(out)

    def _lookup(self, key: str) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError


def _missing(source: str, path: Path, what: str) -> ThesaurusNotFoundError:
    pkg = DEBIAN_PACKAGES[source]
    return ThesaurusNotFoundError(
        f"synonym source '{source}' not found: {what} ({path}). Install the Debian package "
        f"'{pkg}' (apt-get install -y {pkg}) or set views.text.synonyms.path to its location "
        f"(views.text.synonyms.source: wordnet | mythes)")


class WordNetThesaurus(Thesaurus):
    """WordNet 3.0 synonyms (all lemmas of all synsets of the word, in WordNet's sense order)."""

    source = "wordnet"

    def __init__(self, path: str | os.PathLike | None = None):
        root = Path(path or DEFAULT_PATHS["wordnet"])
        if not root.is_dir():
            raise _missing("wordnet", root, "no such directory")
        absent = [f for f in WORDNET_FILES if not (root / f).is_file()]
        if absent:
            raise _missing("wordnet", root, f"missing database files {', '.join(absent)}")
        try:
            import nltk.data
            from nltk.corpus.reader.wordnet import WordNetCorpusReader
        except ImportError as exc:
            raise ImportError("views.text.synonyms.source=wordnet needs the 'nltk' Python package "
                              "(pip install 'nltk>=3.8')") from exc

        class DebianWordNetReader(WordNetCorpusReader):
            """NLTK's reader over the Debian database, with the standard lexnames list."""

            def open(self, file):
                if file == "lexnames" and not (root / "lexnames").is_file():
                    return io.StringIO("".join(
                        f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n"
                        for i, name in enumerate(WORDNET_LEXNAMES)))
                return super().open(file)

            def map_wn(self, version="wordnet"):
                # The Debian database is WordNet 3.0, the version NLTK maps other wordnets to:
                # no mapping needed (the base method would look for NLTK's downloaded copy).
                return None

        # Recent NLTK only opens corpora below its data paths: authorise this one explicitly.
        resolved = str(root.resolve())
        if resolved not in [str(p) for p in nltk.data.path]:
            nltk.data.path.append(resolved)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available"
            self._wn = DebianWordNetReader(resolved, None)
        self.path = root

    def _lookup(self, key: str) -> list[str]:
        return [name for synset in self._wn.synsets(key.replace(" ", "_"))
                for name in synset.lemma_names()]


class MythesThesaurus(Thesaurus):
    """MyThes (LibreOffice) thesaurus: plain synonyms of every meaning, in file order."""

    source = "mythes"
    _MARKED = ("(generic term)", "(similar term)", "(related term)", "(antonym)")

    def __init__(self, path: str | os.PathLike | None = None):
        dat = Path(path or DEFAULT_PATHS["mythes"])
        if dat.is_dir():
            dat = dat / Path(DEFAULT_PATHS["mythes"]).name
        idx = dat.with_suffix(".idx")
        if not dat.is_file():
            raise _missing("mythes", dat, "no such file")
        if not idx.is_file():
            raise _missing("mythes", idx, "index file missing")
        with open(idx, "rb") as f:
            self.encoding = f.readline().decode("ascii").strip() or "UTF-8"
            f.readline()  # number of entries
            offsets = {}
            for raw in f:
                word, _, offset = raw.decode(self.encoding).rstrip("\n").rpartition("|")
                if word and offset.strip().isdigit():
                    offsets[word.lower()] = int(offset)
        self._offsets = offsets
        self.path = dat

    def _lookup(self, key: str) -> list[str]:
        offset = self._offsets.get(key)
        if offset is None:
            return []
        out: list[str] = []
        with open(self.path, "rb") as f:
            f.seek(offset)
            head = f.readline().decode(self.encoding).rstrip("\n")
            count = head.rpartition("|")[2]
            for _ in range(int(count) if count.isdigit() else 0):
                fields = f.readline().decode(self.encoding).rstrip("\n").split("|")
                out.extend(t.strip() for t in fields[1:]
                           if t.strip() and not any(m in t for m in self._MARKED))
        return out


_SOURCES = {"wordnet": WordNetThesaurus, "mythes": MythesThesaurus}


@functools.lru_cache(maxsize=None)
def _load(source: str, path: str | None) -> Thesaurus:
    return _SOURCES[source](path)


def load_thesaurus(cfg: SynonymsConfig | Mapping | None = None) -> Thesaurus:
    """The thesaurus configured by ``views.text.synonyms`` (``source``: wordnet | mythes,
    ``path``: null for the Debian package's; a partial mapping is merged over
    ``configs/train/improved.yaml``'s), loaded once per process."""
    cfg = section_view(SynonymsConfig, "improved", "views.text.synonyms", cfg)
    return _load(cfg.source, str(cfg.path) if cfg.path else None)
