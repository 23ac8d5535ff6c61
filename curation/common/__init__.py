"""What every job of the project stands on, curation and training alike.

* :mod:`~curation.common.config`: YAML configs, ``key.sub=value`` overrides, ``configs/``;
* :mod:`~curation.common.storage`: object-storage settings for every process, URL helpers;
* :mod:`~curation.common.jobs`: Ray start-up, the local-path warning, package versions;
* :mod:`~curation.common.quiet`: known-harmless third-party noise, filtered in every process;
* :mod:`~curation.common.nlp`: the spaCy English pipeline and the caption-parse definitions
  (objects, attributes, subjects) that the C filter and the concept labels share.

These modules import nothing else of the project: ``curation``, ``training`` and ``pipelines``
import them, never the other way round.
"""
