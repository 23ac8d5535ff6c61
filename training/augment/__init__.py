"""Multi-view data of the improved-CLIP recipe: weak and strong image and text views (SPEC 5).

- :mod:`training.augment.image`: torchvision v2 weak/strong image transforms, seeded per call;
- :mod:`training.augment.text`: offline EDA text views (stopwords, swap, deletion, synonyms);
- :mod:`training.augment.thesaurus`: offline synonym sources (WordNet via nltk, MyThes);
- :mod:`training.augment.views`: :class:`MultiViewTransform`, all views of one pair.

Submodules are imported lazily so that ``import training.augment`` stays cheap.
"""

from __future__ import annotations

__all__ = ["MultiViewTransform", "TextAugmenter", "ImageViews", "load_thesaurus", "views_config",
           "sample_seed"]

_WHERE = {"MultiViewTransform": "views", "views_config": "views", "sample_seed": "views",
          "TextAugmenter": "text", "ImageViews": "image", "load_thesaurus": "thesaurus"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"training.augment.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'training.augment' has no attribute {name!r}")
