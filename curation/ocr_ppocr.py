"""PP-OCR on ONNX Runtime: a cheap text detector (and recogniser) for the T filter.

The models are PaddleOCR's PP-OCRv4 mobile detector and English/Chinese recogniser as ONNX files
inside the ``rapidocr_onnxruntime`` wheel (never downloaded); its ``TextDetector`` (DB
post-processing), crop and ``TextRecognizer`` classes do the work, ``onnxruntime`` runs them.

:class:`PPOCRBackend` detects text on the image downscaled to ``det_side`` (its longest side),
which is where most of the cost is; an image without a detected box costs one small detector
pass and no recognition (most web images show no text). Boxes are scaled back and recognised
on crops of the image as decoded (``max_side``), so small text keeps its pixels. ``recogniser``
picks who reads the crops: ``ppocr`` (PP-OCRv4 rec, the default) or ``easyocr`` (EasyOCR's
English recogniser on the same boxes, for when run-together words matter).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RECOGNISERS = ("ppocr", "easyocr")


def ort_providers(gpu: bool) -> dict:
    """RapidOCR's switches for ONNX Runtime's CUDA provider (used when it is installed)."""
    if not gpu:
        return {}
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return {}
    return {"det_use_cuda": True, "rec_use_cuda": True}


class PPOCRBackend:
    """PP-OCRv4 mobile detection at ``det_side``, recognition of the boxes on the decoded image."""

    name = "ppocr"

    def __init__(self, det_side: int = 320, threads: int | None = 1, gpu: bool = False,
                 recogniser: str = "ppocr", batch_size: int = 16, **_ignored):
        import cv2
        from rapidocr_onnxruntime import RapidOCR

        if recogniser not in RECOGNISERS:
            raise ValueError(f"filters.text_spotting.recogniser must be one of {', '.join(RECOGNISERS)}, "
                             f"not {recogniser!r}")
        self.cv2 = cv2
        self.det_side = int(det_side)
        threads = int(threads or 1)
        self.engine = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1, **ort_providers(gpu))
        # RapidOCR's default ("min" 736) upscales small images; with "max" an image at most 960 px
        # (ours: det_side) is only rounded to a multiple of 32
        self.engine.text_det.limit_type = "max"
        self.recogniser = recogniser
        self.name = "ppocr" if recogniser == "ppocr" else f"ppocr+{recogniser}"
        self.batch_size = int(batch_size)
        self.easyocr = None
        if recogniser == "easyocr":
            from curation.ocr import EasyOCRBackend

            self.easyocr = EasyOCRBackend(gpu=gpu, batched=False, batch_size=batch_size).reader

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Text boxes (N x 4 x 2 corner points, reading order) in ``image``'s pixel coordinates."""
        h, w = image.shape[:2]
        scale = min(1.0, self.det_side / max(h, w))
        small = image
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = self.cv2.resize(image, size, interpolation=self.cv2.INTER_AREA)
        boxes, _elapsed = self.engine.text_det(np.ascontiguousarray(small[:, :, ::-1]))  # BGR
        if boxes is None or len(boxes) == 0:
            return np.zeros((0, 4, 2), np.float32)
        boxes = np.asarray(self.engine.sorted_boxes(boxes), np.float32) / scale
        boxes[..., 0] = boxes[..., 0].clip(0, w - 1)
        boxes[..., 1] = boxes[..., 1].clip(0, h - 1)
        return boxes

    def recognise(self, image: np.ndarray, boxes: np.ndarray) -> list[tuple[str, float]]:
        if len(boxes) == 0:
            return []
        if self.easyocr is not None:
            grey = self.cv2.cvtColor(image, self.cv2.COLOR_RGB2GRAY)
            free = [[[float(x), float(y)] for x, y in b] for b in boxes]
            found = self.easyocr.recognize(grey, [], free, batch_size=self.batch_size)
            return [(text, float(conf)) for _box, text, conf in found]
        crops = self.engine.get_crop_img_list(np.ascontiguousarray(image[:, :, ::-1]), list(boxes))
        found, _elapsed = self.engine.text_rec(crops)
        return [(text, float(conf)) for text, conf in found]

    def read(self, images: Sequence[np.ndarray]) -> list[list[tuple[str, float]]]:
        return [self.recognise(a, self.detect(a)) for a in images]
