"""CAT's caption filters: Complexity (C) and Action (A), as pure functions over spaCy Docs.

Every measure takes a parsed ``spacy.tokens.Doc`` and returns an integer score; a filter keeps a
caption when its score is at least the configured minimum. :class:`CaptionScorer` batches
captions through ``nlp.pipe`` with only the pipeline components that the configured measures
need. See SPEC section 1 for the definitions reproduced here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping, Sequence, get_args

from curation.common.nlp import ATTRIBUTE_DEPS, is_object, subjects, with_conjuncts

ComplexityMeasure = Literal["scene_graph", "max_children", "entity_edges"]
ActionMeasure = Literal["verb", "nsubj_verb"]
COMPLEXITY_MEASURES = get_args(ComplexityMeasure)
ACTION_MEASURES = get_args(ActionMeasure)

# --- Complexity -----------------------------------------------------------------------------

PREP_DEPS = {"prep", "agent", "dative"}
OBJECT_DEPS = {"dobj", "obj", "attr", "oprd"}

def scene_graph_edges(doc) -> dict:
    """Edges (attributes + relations) attached to each object node of the caption's scene graph.

    Objects are noun-phrase heads (NOUN/PROPN). Attributes are adjective and number modifiers
    (``amod``, ``nummod``, and a predicate adjective of a copula: "the car is red").
    Relations link two objects through a preposition ("dog on a couch", "man riding on a road")
    or a verb with a subject and an object ("a man riding a horse"); a relation adds one edge to
    each of its two objects.
    """
    edges = {tok.i: 0 for tok in doc if is_object(tok)}

    def add(a, b=None):
        if a.i in edges:
            edges[a.i] += 1
        if b is not None and b.i in edges and b.i != a.i:
            edges[b.i] += 1

    for tok in doc:
        if tok.i in edges:
            for child in tok.children:
                if child.dep_ in ATTRIBUTE_DEPS:
                    add(tok)
        if tok.dep_ == "acomp" and tok.pos_ == "ADJ":
            for subj in subjects(tok.head):
                add(subj)
        if tok.dep_ in PREP_DEPS:
            targets = with_conjuncts(c for c in tok.children if c.dep_ == "pobj")
            host = tok.head
            sources = [host] if is_object(host) else subjects(host)
            for a in sources:
                for b in targets:
                    add(a, b)
        if tok.pos_ == "VERB":
            objs = with_conjuncts(c for c in tok.children if c.dep_ in OBJECT_DEPS)
            for a in subjects(tok):
                for b in objs:
                    add(a, b)
    return edges


def complexity_scene_graph(doc) -> int:
    """DiHT's complexity: the most edges attached to any one object node (0 without objects)."""
    return max(scene_graph_edges(doc).values(), default=0)


def complexity_max_children(doc) -> int:
    """Fondant's measure: the largest number of dependency children of any token."""
    return max((sum(1 for _ in tok.children) for tok in doc), default=0)


ENTITY_POS = {"NOUN", "PROPN", "PRON"}
ENTITY_TAGS = {"NN", "NNS", "NNP", "NNPS", "PRP"}


def entity_edge_counts(doc) -> list[int]:
    """Data-Juicer's entity dependency counts, one per entity token.

    An entity is a token with POS in {NOUN, PROPN, PRON} and tag in {NN, NNS, NNP, NNPS, PRP}.
    Its count is 1 if it is not a sentence root, plus one for each non-punctuation child.
    """
    counts = {}
    for tok in doc:
        if tok.pos_ in ENTITY_POS and tok.tag_ in ENTITY_TAGS:
            counts[tok.i] = 0 if tok.dep_ == "ROOT" else 1
    for tok in doc:
        if tok.pos_ == "PUNCT" or tok.dep_ == "ROOT":
            continue
        if tok.head.i in counts:
            counts[tok.head.i] += 1
    return list(counts.values())


def complexity_entity_edges(doc, mode: str = "any") -> int:
    """Largest ("any") or smallest ("all") entity count; 0 when the caption has no entity."""
    counts = entity_edge_counts(doc)
    if not counts:
        return 0
    if mode == "any":
        return max(counts)
    if mode == "all":
        return min(counts)
    raise ValueError(f"entity_mode must be 'any' or 'all', not {mode!r}")


# --- Action -----------------------------------------------------------------------------------

VERB_TAGS = {"VB", "VBD", "VBG", "VBN", "VBP", "VBZ"}


def actions_verb(doc) -> int:
    """Data-Juicer's action count: tokens with POS VERB and a verb tag (AUX is not an action)."""
    return sum(1 for tok in doc if tok.pos_ == "VERB" and tok.tag_ in VERB_TAGS)


def actions_nsubj_verb(doc) -> int:
    """Fondant's action count: distinct VERB tokens that head an ``nsubj`` dependent."""
    return len({tok.head.i for tok in doc if tok.dep_ == "nsubj" and tok.head.pos_ == "VERB"})


# --- Configuration and batch scoring ------------------------------------------------------------

@dataclass(frozen=True)
class ComplexitySettings:
    """``filters.complexity`` (a typed view: the defaults live in the YAML)."""

    enabled: bool
    measure: ComplexityMeasure     # scene_graph (DiHT) | max_children (Fondant) | entity_edges (Data-Juicer)
    min: int                       # keep when complexity >= min
    entity_mode: Literal["any", "all"]  # entity_edges only


@dataclass(frozen=True)
class ActionSettings:
    """``filters.action``."""

    enabled: bool
    measure: ActionMeasure         # verb (Data-Juicer) | nsubj_verb (Fondant)
    min: int                       # keep when the number of actions >= min


@dataclass(frozen=True)
class CaptionFilterConfig:
    """What one spaCy parse scores: the Complexity and Action filters' settings (None: that
    filter is not in the cascade, so off)."""

    complexity: ComplexitySettings | None
    action: ActionSettings | None

    @classmethod
    def from_config(cls, filters: Mapping) -> "CaptionFilterConfig":
        """From a ``filters`` mapping: name -> the filter's settings view, or its YAML section
        (parsed here, errors naming ``filters.<name>.<key>``)."""
        def section(name: str, kind: type):
            value = filters[name] if name in filters else None
            if value is None or isinstance(value, kind):
                return value
            from curation.common.config import typed_view

            return typed_view(kind, value, f"filters.{name}")

        return cls(section("complexity", ComplexitySettings), section("action", ActionSettings))

    @classmethod
    def defaults(cls, complexity: Mapping | None = None, action: Mapping | None = None) -> "CaptionFilterConfig":
        """The YAML's ``filters.complexity`` and ``filters.action`` with changes (tests, tools)."""
        from curation.settings import section_defaults

        return cls.from_config({"complexity": {**section_defaults("filters.complexity"), **(complexity or {})},
                                "action": {**section_defaults("filters.action"), **(action or {})}})

    @property
    def complexity_enabled(self) -> bool:
        return self.complexity is not None and self.complexity.enabled

    @property
    def action_enabled(self) -> bool:
        return self.action is not None and self.action.enabled

    @property
    def complexity_measure(self) -> str | None:
        return self.complexity.measure if self.complexity else None

    @property
    def action_measure(self) -> str | None:
        return self.action.measure if self.action else None

    @property
    def complexity_min(self) -> int | None:
        return self.complexity.min if self.complexity else None

    @property
    def action_min(self) -> int | None:
        return self.action.min if self.action else None

    @property
    def entity_mode(self) -> str | None:
        return self.complexity.entity_mode if self.complexity else None

    @property
    def enabled(self) -> bool:
        return self.complexity_enabled or self.action_enabled

    def complexity_fn(self) -> Callable:
        if self.complexity_measure == "scene_graph":
            return complexity_scene_graph
        if self.complexity_measure == "max_children":
            return complexity_max_children
        mode = self.entity_mode
        return lambda doc: complexity_entity_edges(doc, mode)

    def action_fn(self) -> Callable:
        return actions_verb if self.action_measure == "verb" else actions_nsubj_verb

    def required_components(self) -> list[str]:
        """spaCy components the enabled measures' results depend on: the tagger and attribute
        ruler for POS/tags, and the parser whenever any filter is on. Every measure but the
        ``verb`` action count reads dependencies; the ``verb`` count needs the parser too,
        because ``en_core_web_sm``'s attribute ruler reads the parse to decide whether
        have/do/be are main verbs (VERB) or auxiliaries (AUX): without it "Feds Have 104
        Positive MLB Drug Tests" has no action, and on 1,000 real LAION captions 17 counts and 4
        decisions change."""
        needed = ["tok2vec", "tagger", "attribute_ruler"]
        if self.enabled:
            needed.append("parser")
        return needed


@dataclass
class CaptionScores:
    complexity: list  # int or None (not evaluated)
    num_actions: list
    passed_complexity: list  # bool or None
    passed_action: list


def score_docs(docs: Iterable, cfg: CaptionFilterConfig) -> CaptionScores:
    cfn, afn = cfg.complexity_fn(), cfg.action_fn()
    out = CaptionScores([], [], [], [])
    for doc in docs:
        if cfg.complexity_enabled:
            c = cfn(doc)
            out.complexity.append(c)
            out.passed_complexity.append(c >= cfg.complexity_min)
        else:
            out.complexity.append(None)
            out.passed_complexity.append(None)
        if cfg.action_enabled:
            a = afn(doc)
            out.num_actions.append(a)
            out.passed_action.append(a >= cfg.action_min)
        else:
            out.num_actions.append(None)
            out.passed_action.append(None)
    return out


class CaptionScorer:
    """Scores lists of captions with one spaCy pipeline, loaded once."""

    def __init__(self, cfg: CaptionFilterConfig, model: str = "en_core_web_sm",
                 batch_size: int = 256, nlp=None):
        from curation.common.nlp import load_english

        self.cfg = cfg
        self.batch_size = batch_size
        self.nlp = nlp if nlp is not None else load_english(model, cfg.required_components())

    def score(self, captions: Sequence[str]) -> CaptionScores:
        if not self.cfg.enabled:
            return score_docs((None for _ in captions), self.cfg)
        # surrounding whitespace stripped first, as Data-Juicer does (spaCy makes tokens of it)
        texts = (c.strip() if isinstance(c, str) else c for c in captions)
        docs = self.nlp.pipe(texts, batch_size=self.batch_size)
        return score_docs(docs, self.cfg)
