"""The generation cache in the image and detection stages (tiny placeholders, in process):
a second actor on the same cache serves every row without loading its model, with outputs
equal to the first; a changed setting that changes the output misses; one that does not
(detection's phrase matching) hits."""
from __future__ import annotations

import numpy as np
import pytest

from actors.detection import GroundingDINO
from actors.text2image import Text2Image
from tests.helpers import coco_images, placeholder_models
from udfs import rows

SD3 = {"backend": "diffusers", "model": "placeholder:tiny-sd3"}
DINO = {"backend": "grounding_dino", "model": "placeholder:tiny-grounding-dino"}
T2I_PARAMS = {"height": 64, "width": 64, "num_inference_steps": 2, "num_threads": 1, "guidance_scale": 2.0}
DINO_PARAMS = {"image_size": 64, "max_size": 96, "num_threads": 1, "box_threshold": 0.0, "text_threshold": 0.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    yield from placeholder_models(tmp_path_factory, "mmsynth-cache-models", {"sd3": SD3, "dino": DINO})


def _t2i_batch():
    return {"id": np.array(["a", "b", "c"], dtype=object),
            "prompt": np.array(["a red (cup:1.3) on a table", "a dog", None], dtype=object),
            "negative_prompt": np.array(["cat", None, None], dtype=object)}


def test_text2image_cache_serves_images_without_loading_the_pipeline(models, tmp_path):
    cache = {"uri": str(tmp_path / "cache")}
    first = Text2Image(models["sd3"], T2I_PARAMS, cache=cache)
    assert first.pipe is None  # with a cache the pipeline loads at the first miss
    out1 = first(_t2i_batch())
    assert first.pipe is not None
    assert list(out1["gen_cache_hits"]) == [0, 0, 0] and list(out1["gen_cache_misses"]) == [1, 1, 0]
    assert out1[rows.ROW_ERROR][2] and out1[rows.ROW_ERROR][0] is None  # no prompt: an input error, no call

    second = Text2Image(models["sd3"], T2I_PARAMS, cache=cache)
    out2 = second(_t2i_batch())
    assert second.pipe is None  # every row from the cache: the model never loaded
    assert list(out2["gen_cache_hits"]) == [1, 1, 0] and list(out2["gen_cache_misses"]) == [0, 0, 0]
    for col in ("image_png", "seed", "gen_height", "gen_width", "prompt_weights_stripped"):
        assert list(out2[col][:2]) == list(out1[col][:2]), col
    assert list(out2["prompt_weights_stripped"][:2]) == [True, False]  # SD3: weights stripped, remembered

    uncached = Text2Image(models["sd3"], T2I_PARAMS)(_t2i_batch())  # the cache changes nothing
    assert list(uncached["image_png"][:2]) == list(out1["image_png"][:2])
    assert list(uncached["gen_cache_hits"]) == [0, 0, 0] and list(uncached["gen_cache_misses"]) == [0, 0, 0]

    other = Text2Image(models["sd3"], {**T2I_PARAMS, "guidance_scale": 3.0}, cache=cache)(_t2i_batch())
    assert list(other["gen_cache_misses"]) == [1, 1, 0]  # another guidance scale is another image


def test_detection_cache_serves_detections_and_rematches_names(models, tmp_path):
    img = coco_images(2)
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "image": np.array([img[0], img[1], "/nope.jpg"], dtype=object),
             "present": np.array([["dog", "cat"], ["person"], ["cup"]], dtype=object),
             "no_exist": np.array([["zebra"], [], ["car"]], dtype=object)}
    cache = {"uri": str(tmp_path / "cache")}
    first = GroundingDINO(models["dino"], DINO_PARAMS, cache=cache)
    assert first.model is None
    out1 = first(dict(batch))
    assert list(out1["det_cache_hits"]) == [0, 0, 0] and list(out1["det_cache_misses"]) == [2, 1, 0]
    assert "image file not found" in out1[rows.ROW_ERROR][2]

    second = GroundingDINO(models["dino"], {**DINO_PARAMS, "match": "strict"}, cache=cache)
    out2 = second(dict(batch))
    assert second.model is None  # matching is not part of the key: the detections are reused
    assert list(out2["det_cache_hits"]) == [2, 1, 0] and list(out2["det_cache_misses"]) == [0, 0, 0]
    assert list(out2["present_raw"][:2]) == list(out1["present_raw"][:2])
    strict = GroundingDINO(models["dino"], {**DINO_PARAMS, "match": "strict"})(dict(batch))
    for col in ("present_detected", "present_scores", "no_exist_raw"):
        assert list(out2[col][:2]) == list(strict[col][:2]), col  # same as a fresh strict run
    assert out2[rows.ROW_ERROR][2] == out1[rows.ROW_ERROR][2]

    third = GroundingDINO(models["dino"], {**DINO_PARAMS, "box_threshold": 0.5}, cache=cache)(dict(batch))
    assert list(third["det_cache_misses"]) == [2, 1, 0]  # a threshold changes the detections: a miss
