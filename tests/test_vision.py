"""Vision stages with their tiny placeholder models: text-to-image, Grounding DINO, CLIP.

Every stage runs once through a real Ray Data pipeline (actor pool of one, fractional CPU)
and is compared with direct in-process calls of the same actor class: batch results equal
one-by-one results, seeds are deterministic, broken inputs become row errors naming the file.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors import placeholders
from actors.models import materialize, resolve
from tests.helpers import coco_images, numpy_batch, placeholder_models, run_ray, single  # noqa: F401 (re-exported)
from udfs import rows
from udfs.images import encode_png, load_image

SD3 = {"backend": "diffusers", "model": "placeholder:tiny-sd3"}
DINO = {"backend": "grounding_dino", "model": "placeholder:tiny-grounding-dino"}
CLIP = {"backend": "open_clip", "model": "placeholder:tiny-clip"}
T2I_PARAMS = {"height": 64, "width": 64, "num_inference_steps": 2, "num_threads": 1}
DINO_PARAMS = {"image_size": 64, "max_size": 96, "num_threads": 1}


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A private model cache with the three placeholders built once (MMSYNTH_CACHE)."""
    yield from placeholder_models(tmp_path_factory, "mmsynth-cache", {"sd3": SD3, "dino": DINO, "clip": CLIP})


@pytest.fixture(scope="session")
def broken_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("broken")
    corrupt = d / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    truncated = d / "truncated.jpg"
    truncated.write_bytes(Path(coco_images(1)[0]).read_bytes()[:2000])
    return {"missing": str(d / "missing.jpg"), "corrupt": str(corrupt), "truncated": str(truncated)}


@pytest.fixture(scope="session")
def same_size_images(tmp_path_factory):
    """COCO photos resized to one size (96 x 72 px, PNG), so Grounding DINO batches them in one pass."""
    d = tmp_path_factory.mktemp("same-size")
    out = []
    for i, path in enumerate(coco_images(4)):
        p = d / f"img{i}.png"
        Image.open(path).convert("RGB").resize((96, 72)).save(p)
        out.append(str(p))
    return out


@pytest.fixture(scope="session")
def t2i(cache):
    from actors.text2image import Text2Image

    return Text2Image(cache["sd3"], T2I_PARAMS)


@pytest.fixture(scope="session")
def dino(cache):
    from actors.detection import GroundingDINO

    return GroundingDINO(cache["dino"], DINO_PARAMS)


@pytest.fixture(scope="session")
def clip_sim(cache):
    from actors.clip import CLIPScorer

    return CLIPScorer(cache["clip"], {"return_embeddings": True, "num_threads": 1})


# -- images ------------------------------------------------------------------------------

def test_load_image_sources_and_errors(broken_images):
    path = coco_images(1)[0]
    img = load_image(path, "r1", "image")
    assert img.mode == "RGB" and img.size == Image.open(path).size
    assert np.array_equal(np.asarray(load_image(Path(path).read_bytes(), "r1")), np.asarray(img))
    assert np.array_equal(np.asarray(load_image({"bytes": None, "path": path}, "r1")), np.asarray(img))
    png = encode_png(img)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and encode_png(img) == png
    assert np.array_equal(np.asarray(load_image(png, "r1")), np.asarray(img))
    for kind, value in broken_images.items():
        with pytest.raises(rows.InputError) as err:
            load_image(value, "row-7", "picture")
        assert "row 'row-7' field 'picture'" in str(err.value) and value in str(err.value), kind
    for value in (None, "", b"garbage", 3):
        with pytest.raises(rows.InputError, match="row 'r' field 'image'"):
            load_image(value, "r", "image")


# -- placeholders ------------------------------------------------------------------------

def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.parametrize("builder", ["build_tiny_grounding_dino", "build_tiny_clip", "build_tiny_sd3"])
def test_placeholder_builds_are_deterministic(builder, tmp_path):
    getattr(placeholders, builder)(tmp_path / "a")
    getattr(placeholders, builder)(tmp_path / "b")
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a and a == b


def test_placeholder_built_once_then_loaded_from_cache(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(placeholders, "build_tiny_clip", lambda target: calls.append(target))
    resolved = resolve(CLIP)
    path = Path(materialize(resolved))
    assert calls == [] and (path / ".complete").exists()          # built by the fixture, reused
    assert sorted(p.name for p in path.iterdir()) == [".complete", "open_clip_config.json",
                                                      "open_clip_model.safetensors"]
    sd3 = Path(resolve(SD3).path)
    assert (sd3 / "model_index.json").exists() and (sd3 / "transformer" / "config.json").exists()
    dino = Path(resolve(DINO).path)
    assert {"config.json", "model.safetensors", "processor_config.json"} <= {p.name for p in dino.iterdir()}


# -- text to image -----------------------------------------------------------------------

T2I_ROWS = [
    {"id": "cap-0", "prompt": "a (bird house:1.3) covered in (snow:1.2)", "negative_prompt": "(bird:1.2), (leaves:1.1)",
     "seed": None},
    {"id": "cap-1", "prompt": "a dog on a bench", "negative_prompt": None, "seed": None},
    {"id": "cap-2", "prompt": "a cat", "negative_prompt": "car", "seed": 1234},
    {"id": "cap-3", "prompt": "", "negative_prompt": None, "seed": None},                  # invalid
    {"id": "cap-4", "prompt": "a red kite in the sky", "negative_prompt": "tree", "seed": None},
    {"id": "cap-5", "prompt": "a pizza on a plate", "negative_prompt": None, "seed": None},
]


def test_text2image_columns():
    from actors.text2image import Text2Image

    assert Text2Image.columns({}) == (["id", "prompt"], ["image_png", "seed", "gen_steps", "gen_guidance_scale",
                                                          "gen_height", "gen_width", "prompt_weights_stripped",
                                                          "gen_cache_hits", "gen_cache_misses"])
    ins, outs = Text2Image.columns({"output_dir": "s3://b/x", "prompt_column": "caption"})
    assert ins == ["id", "caption"] and outs[0] == "image"
    defaults = Text2Image.Params()
    assert (defaults.num_inference_steps, defaults.guidance_scale) == (28, 7.5)


def test_negative_prompt_without_guidance_is_refused_at_planning():
    """diffusers applies a negative prompt only with classifier-free guidance (scale > 1)."""
    from actors.identity_t2i import IdentityText2Image
    from actors.text2image import Text2Image

    with pytest.raises(ValueError, match="guidance_scale 0.0.*negative"):
        Text2Image.Params(guidance_scale=0.0, negative_column="prompt_neg", negative_suffix="")
    with pytest.raises(ValueError, match="negative_suffix"):
        Text2Image.Params(guidance_scale=1.0)  # the default quality negatives would be ignored too
    with pytest.raises(ValueError, match="guidance_scale 1.0"):
        IdentityText2Image.Params(guidance_scale=1.0, negative_column="neg", negative_suffix="")
    assert Text2Image.Params(guidance_scale=0.0, negative_suffix="").guidance_scale == 0.0  # nothing to ignore
    assert Text2Image.Params(guidance_scale=1.5, negative_column="prompt_neg").guidance_scale == 1.5
    with pytest.warns(UserWarning, match="negative"):
        Text2Image.Params(guidance_scale=0.0, negative_column="prompt_neg", ignored_negative="warn")


def test_text2image_ray_pipeline_matches_direct_calls(ray_local, cache, t2i, tmp_path):
    from actors.text2image import Text2Image

    out_dir = tmp_path / "images"
    params = {**T2I_PARAMS, "output_dir": str(out_dir)}
    got = run_ray(ray_local, Text2Image, cache["sd3"], params, T2I_ROWS, batch_size=3)
    assert [r["id"] for r in got] == [r["id"] for r in T2I_ROWS]
    by_id = {r["id"]: r for r in got}
    bad = by_id["cap-3"]
    assert bad[rows.ROW_ERROR].startswith("InputError: row 'cap-3' field 'prompt'") and bad["image"] is None
    good = [r for r in got if r["id"] != "cap-3"]
    for r in good:
        assert r[rows.ROW_ERROR] is None
        assert r["image"] == str(out_dir / f"{r['id']}.png") and Path(r["image"]).exists()
        img = Image.open(r["image"])
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)
        assert (r["gen_height"], r["gen_width"], r["gen_steps"], r["gen_guidance_scale"]) == (64, 64, 2, 7.5)
    assert by_id["cap-2"]["seed"] == 1234                               # explicit seed column wins
    assert by_id["cap-1"]["seed"] == rows.seed_from_id("cap-1")         # default: derived from the id
    # SD3 cannot apply (object:w) weights (no compel support): stripped and flagged per row
    assert by_id["cap-0"]["prompt_weights_stripped"]
    assert not by_id["cap-1"]["prompt_weights_stripped"]
    arrays = {r["id"]: decode(Path(r["image"]).read_bytes()) for r in good}
    assert len({a.tobytes() for a in arrays.values()}) == len(good)     # different rows, different images

    # the same rows in-process, same batch size and thread count: identical PNG bytes
    direct = {}
    for lo in range(0, len(T2I_ROWS), 3):
        out = t2i(numpy_batch(T2I_ROWS[lo:lo + 3]))
        direct.update({rid: png for rid, png in zip(out["id"], out["image_png"])})
    for r in good:
        assert Path(r["image"]).read_bytes() == direct[r["id"]], r["id"]
    # one row at a time: the same images up to float rounding (NOTES identity-generation §5)
    for row in T2I_ROWS:
        if row["id"] == "cap-3":
            continue
        alone = t2i(numpy_batch([row]))
        assert alone[rows.ROW_ERROR][0] is None
        assert np.abs(decode(alone["image_png"][0]) - arrays[row["id"]]).max() <= 2, row["id"]


def test_text2image_seed_determinism_and_weight_stripping(t2i):
    a = t2i(numpy_batch([{"id": "same", "prompt": "a (cat:1.3) on a mat", "negative_prompt": "(dog:1.5)"}]))
    b = t2i(numpy_batch([{"id": "same", "prompt": "a (cat:1.3) on a mat", "negative_prompt": "(dog:1.5)"}]))
    plain = t2i(numpy_batch([{"id": "same", "prompt": "a cat on a mat", "negative_prompt": "dog"}]))
    other = t2i(numpy_batch([{"id": "other", "prompt": "a (cat:1.3) on a mat", "negative_prompt": "(dog:1.5)"}]))
    assert a["image_png"][0] == b["image_png"][0]                      # same id -> same bytes
    assert a["image_png"][0] == plain["image_png"][0]                  # weights stripped exactly
    assert bool(a["prompt_weights_stripped"][0]) and not bool(plain["prompt_weights_stripped"][0])
    assert a["image_png"][0] != other["image_png"][0]                  # other id -> other seed
    assert a["seed"][0] == rows.seed_from_id("same") != other["seed"][0]


def test_text2image_halves_batch_on_out_of_memory(t2i, monkeypatch):
    import torch

    batch = numpy_batch([{"id": f"oom-{i}", "prompt": f"a photo of a {w}"}
                         for i, w in enumerate(["cat", "dog", "bus", "kite"])])
    reference = t2i(batch)
    calls = []
    original = t2i._generate

    def flaky(items):
        calls.append(len(items))
        if len(items) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(items)

    monkeypatch.setattr(t2i, "_generate", flaky)
    out = t2i(batch)
    assert calls == [4, 2, 1, 1, 2, 1, 1]
    assert list(out[rows.ROW_ERROR]) == [None] * 4
    for x, y in zip(out["image_png"], reference["image_png"]):
        assert np.abs(decode(x) - decode(y)).max() <= 2

    def always(items):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(t2i, "_generate", always)
    out = t2i(batch)
    assert all(e.startswith("OutOfMemoryError: row 'oom-") for e in out[rows.ROW_ERROR])
    assert list(out["image_png"]) == [None] * 4


def test_run_halving_on_oom_helper():
    import torch

    from actors.batching import run_halving_on_oom

    sizes = []

    def fn(items):
        if len(items) > 2 or 5 in items:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [x * 10 for x in items]

    out = run_halving_on_oom(fn, [1, 2, 3, 4, 5], sizes)
    assert out[:4] == [10, 20, 30, 40] and isinstance(out[4], torch.OutOfMemoryError)
    assert sizes == [5, 2, 3, 1, 2, 1, 1]
    with pytest.raises(ValueError, match="not an OOM"):
        run_halving_on_oom(lambda items: (_ for _ in ()).throw(ValueError("not an OOM")), [1, 2])
    assert run_halving_on_oom(fn, []) == []


def test_text2image_bad_seed_and_missing_prompt(t2i):
    out = t2i(numpy_batch([{"id": "s1", "prompt": "a cat", "seed": "abc"},
                           {"id": "s2", "prompt": None, "seed": None},
                           {"id": "s3", "prompt": "a dog", "seed": 7}]))
    assert out[rows.ROW_ERROR][0] == "InputError: row 's1' field 'seed': seed 'abc' is not an integer"
    assert out[rows.ROW_ERROR][1].startswith("InputError: row 's2' field 'prompt'")
    assert out[rows.ROW_ERROR][2] is None and out["seed"][2] == 7 and out["image_png"][2][:4] == b"\x89PNG"


def test_text2image_compel_applies_weights_on_stable_diffusion(tmp_path):
    from actors.text2image import Text2Image

    placeholders.build_tiny_sd(tmp_path / "tiny-sd")
    model = resolve({"backend": "diffusers", "model": str(tmp_path / "tiny-sd")}).model_dump()
    actor = Text2Image(model, T2I_PARAMS)
    assert actor.weights_supported and not actor.placeholder
    rows_ = [{"id": "w", "prompt": "a (cat:1.8) on a mat"}, {"id": "w", "prompt": "a cat on a mat"}]
    weighted, plain = (actor(numpy_batch([r])) for r in rows_)
    assert not weighted["prompt_weights_stripped"][0]
    assert np.abs(decode(weighted["image_png"][0]) - decode(plain["image_png"][0])).max() > 2
    stripping = Text2Image(model, {**T2I_PARAMS, "weighted_prompts": False})
    stripped = stripping(numpy_batch([rows_[0]]))
    assert stripped["prompt_weights_stripped"][0]


def test_weight_syntax_helpers():
    from actors.text2image import has_weights, image_file_name, strip_weights, to_compel_syntax

    text = "a (bird house:1.3) covered in (snow: 1.2) (not a weight)"
    assert has_weights(text) and not has_weights("a bird (house)")
    assert strip_weights(text) == "a bird house covered in snow (not a weight)"
    assert to_compel_syntax(text) == "a (bird house)1.3 covered in (snow)1.2 \\(not a weight\\)"
    assert image_file_name("abc-1") == "abc-1.png"
    assert image_file_name("../x/y").startswith("___x_y-") and image_file_name("../x/y").endswith(".png")


# -- grounding dino ----------------------------------------------------------------------

def dino_rows(images: list[str], broken: dict) -> list[dict]:
    return [
        {"id": "d0", "image": images[0], "present": ["cat", "dog"], "no_exist": ["hot dog"]},
        {"id": "d1", "image": images[1], "present": ["people", "game"], "no_exist": []},
        {"id": "d2", "image": images[2], "present": ["bird house", "snow"], "no_exist": ["car", "bus", "zebu"]},
        {"id": "d3", "image": broken["missing"], "present": ["cat"], "no_exist": ["dog"]},
        {"id": "d4", "image": images[3], "present": ["Giraffes"], "no_exist": ["tree"]},
        {"id": "d5", "image": broken["corrupt"], "present": ["cat"], "no_exist": ["dog"]},
    ]


def test_grounding_dino_columns():
    from actors.detection import GroundingDINO, build_caption

    ins, outs = GroundingDINO.columns({"phrase_columns": ["present", "no_exist"]})
    assert ins == ["id", "image", "present", "no_exist"]
    assert outs[:4] == ["present_detected", "present_scores", "present_boxes", "present_raw"] and len(outs) == 10
    assert outs[-2:] == ["det_cache_hits", "det_cache_misses"]
    p = GroundingDINO.Params()
    assert (p.box_threshold, p.text_threshold, p.image_size, p.max_size, p.match) == (0.25, 0.35, 800, 1333, "robust")
    assert build_caption(["Cat", "hot  dog", "St. Bernard"]) == "cat. hot dog. st bernard."


def _check_detection_row(r: dict, requested: list[str], size: tuple[int, int]):
    w, h = size
    raw = json.loads(r["raw"])
    scores, boxes = json.loads(r["scores"]), json.loads(r["boxes"])
    assert list(r["detected"]) == [n for n in requested if n in scores]
    assert set(scores) == set(boxes)
    for det in raw:
        assert set(det) == {"label", "score", "box"} and 0.25 < det["score"] <= 1.0
        x0, y0, x1, y1 = det["box"]
        assert -1 <= x0 <= x1 <= w + 1 and -1 <= y0 <= y1 <= h + 1
    for name, bs in boxes.items():
        assert bs and all(b in [d["box"] for d in raw] for b in bs)
        assert scores[name] == max(d["score"] for d in raw if d["box"] in bs)


def test_grounding_dino_ray_pipeline_matches_direct_calls(ray_local, cache, dino, same_size_images, broken_images):
    from actors.detection import GroundingDINO

    items = dino_rows(same_size_images, broken_images)
    got = run_ray(ray_local, GroundingDINO, cache["dino"], DINO_PARAMS, items, batch_size=6)
    by_id = {r["id"]: r for r in got}
    assert by_id["d3"][rows.ROW_ERROR] == (f"InputError: row 'd3' field 'image': image file not found: "
                                           f"{broken_images['missing']}")
    assert by_id["d5"][rows.ROW_ERROR].startswith(
        f"InputError: row 'd5' field 'image': cannot decode image {broken_images['corrupt']}")
    assert by_id["d3"]["present_detected"] is None and by_id["d5"]["no_exist_raw"] is None
    n_raw = 0
    for item in items:
        r = by_id[item["id"]]
        if item["id"] in ("d3", "d5"):
            continue
        assert r[rows.ROW_ERROR] is None
        for c in ("present", "no_exist"):
            cols = {k: r[f"{c}_{k}"] for k in ("detected", "scores", "boxes", "raw")}
            _check_detection_row(cols, item[c], (96, 72))
            n_raw += len(json.loads(cols["raw"]))
        if not item["no_exist"]:
            assert list(r["no_exist_detected"]) == []
    assert n_raw > 0                                   # the tiny random model does fire
    assert json.loads(by_id["d1"]["no_exist_raw"]) == []    # empty phrase list: nothing detected

    # direct, whole batch: identical to the Ray stage; one by one: allclose
    batch = numpy_batch(items)
    direct = dino(batch)
    for i, item in enumerate(items):
        for c in ("present", "no_exist"):
            assert direct[f"{c}_raw"][i] == by_id[item["id"]][f"{c}_raw"]
        if item["id"] in ("d3", "d5"):
            continue
        alone = dino(single(batch, i))
        for c in ("present", "no_exist"):
            a, b = json.loads(direct[f"{c}_raw"][i]), json.loads(alone[f"{c}_raw"][0])
            assert [d["label"] for d in a] == [d["label"] for d in b]
            np.testing.assert_allclose([d["score"] for d in a], [d["score"] for d in b], atol=1e-4)
            np.testing.assert_allclose([d["box"] for d in a] or np.zeros((0, 4)),
                                       [d["box"] for d in b] or np.zeros((0, 4)), atol=0.05)
            assert list(direct[f"{c}_detected"][i]) == list(alone[f"{c}_detected"][0])


def test_grounding_dino_strict_is_subset_of_robust(cache, dino, same_size_images, broken_images):
    from actors.detection import GroundingDINO
    from udfs.phrases import match_phrases

    strict = GroundingDINO(cache["dino"], {**DINO_PARAMS, "match": "strict"})
    batch = numpy_batch([r for r in dino_rows(same_size_images, broken_images) if r["id"] not in ("d3", "d5")])
    a, b = dino(batch), strict(batch)
    for i in range(len(batch["id"])):
        for c in ("present", "no_exist"):
            assert a[f"{c}_raw"][i] == b[f"{c}_raw"][i]            # same model outputs
            labels = [d["label"] for d in json.loads(b[f"{c}_raw"][i])]
            expected = [n for n, idx in match_phrases(list(batch[c][i]), labels, mode="strict").items() if idx]
            assert list(b[f"{c}_detected"][i]) == expected
            assert set(b[f"{c}_detected"][i]) <= set(a[f"{c}_detected"][i])


def test_grounding_dino_bytes_and_mixed_sizes(dino):
    paths = coco_images(3)                                      # three different sizes
    by_path = numpy_batch([{"id": f"m{i}", "image": p, "present": ["person", "car"], "no_exist": ["dog"]}
                           for i, p in enumerate(paths)])
    by_bytes = numpy_batch([{"id": f"m{i}", "image": Path(p).read_bytes(), "present": ["person", "car"],
                             "no_exist": ["dog"]} for i, p in enumerate(paths)])
    a, b = dino(by_path), dino(by_bytes)
    assert list(a["present_raw"]) == list(b["present_raw"])
    for i, p in enumerate(paths):                              # boxes in each image's own pixels
        w, h = Image.open(p).size
        for det in json.loads(a["present_raw"][i]):
            assert det["box"][2] <= w + 1 and det["box"][3] <= h + 1
        assert a["present_raw"][i] == dino(single(by_path, i))["present_raw"][0]   # no cross-image padding


# -- clip --------------------------------------------------------------------------------

def test_clip_columns_and_model_names(cache):
    from actors.clip import CLIPScorer, clip_model_name, clip_pretrained
    from actors.models import ResolvedModel

    assert CLIPScorer.columns({"text_column": "caption"}) == (["id", "image", "caption"], ["clip_scores"])
    assert CLIPScorer.columns({"mode": "zero_shot", "keywords": ["a"], "return_embeddings": True}) == (
        ["id", "image"], ["keyword", "keyword_scores", "clip_image_embedding"])
    placeholder = ResolvedModel.model_validate(cache["clip"])
    assert clip_model_name(placeholder) == f"local-dir:{placeholder.path}" and clip_pretrained(placeholder) is None
    arch = resolve({"backend": "open_clip", "model": "ViT-B-32", "options": {"pretrained": "openai"}})
    assert (clip_model_name(arch), clip_pretrained(arch)) == ("ViT-B-32", "openai")
    hf = resolve({"backend": "open_clip", "model": "openai/clip-vit-large-patch14"})
    assert (clip_model_name(hf), clip_pretrained(hf)) == ("ViT-L-14", "openai")
    hub = resolve({"backend": "open_clip", "model": "hf-hub:timm/ViT-B-16-SigLIP"})
    assert (clip_model_name(hub), clip_pretrained(hub)) == ("hf-hub:timm/ViT-B-16-SigLIP", None)
    with pytest.raises(ValueError, match="needs options.pretrained"):
        CLIPScorer(resolve({"backend": "open_clip", "model": "ViT-B-32"}).model_dump(), {})


def test_clip_ray_pipeline_matches_direct_calls(ray_local, cache, clip_sim, broken_images):
    import torch

    from actors.clip import CLIPScorer

    paths = coco_images(4)
    items = [
        {"id": "c0", "image": paths[0], "text": ["a photo of a cat", "a bus", "a photo of a cat"]},
        {"id": "c1", "image": paths[1], "text": ["a dog"]},
        {"id": "c2", "image": broken_images["truncated"], "text": ["a dog"]},
        {"id": "c3", "image": paths[2], "text": ["a pizza", "a kite"]},
        {"id": "c4", "image": paths[3], "text": ["a bench"]},
    ]
    params = {"return_embeddings": True, "num_threads": 1}
    got = {r["id"]: r for r in run_ray(ray_local, CLIPScorer, cache["clip"], params, items, batch_size=5)}
    assert got["c2"][rows.ROW_ERROR].startswith(
        f"InputError: row 'c2' field 'image': cannot decode image {broken_images['truncated']}")
    assert got["c2"]["clip_scores"] is None
    model, tok = clip_sim.model, clip_sim.tokenizer
    for item in items:
        if item["id"] == "c2":
            continue
        r = got[item["id"]]
        scores = np.asarray(r["clip_scores"], dtype=np.float64)
        assert scores.shape == (len(item["text"]),) and np.all(np.abs(scores) <= 1.0)
        emb = np.asarray(r["clip_image_embedding"], dtype=np.float32)
        assert emb.shape == (32,) and abs(np.linalg.norm(emb) - 1) < 1e-5
        texts = np.asarray(r["clip_text_embeddings"], dtype=np.float32)
        assert texts.shape == (len(item["text"]), 32)
        np.testing.assert_allclose(scores, texts @ emb, atol=1e-5)
        # independent computation with the open_clip model itself
        with torch.no_grad():
            x = clip_sim.preprocess(Image.open(item["image"]).convert("RGB"))[None]
            fi = model.encode_image(x, normalize=True)[0]
            ft = model.encode_text(tok(item["text"]), normalize=True)
        np.testing.assert_allclose(scores, (ft @ fi).numpy(), atol=1e-5)
        # one by one (direct) equals the batched Ray stage
        alone = clip_sim(numpy_batch([item]))
        np.testing.assert_allclose(alone["clip_scores"][0], scores, atol=1e-5)
    assert got["c0"]["clip_scores"][0] == pytest.approx(got["c0"]["clip_scores"][2])   # same text, same score


def test_clip_text_cell_forms(clip_sim):
    path = coco_images(1)[0]
    out = clip_sim(numpy_batch([{"id": "s", "image": path, "text": "a cat"},
                                {"id": "l", "image": path, "text": ["a cat", "a dog"]},
                                {"id": "n", "image": path, "text": None}]))
    assert len(out["clip_scores"][0]) == 1 and len(out["clip_scores"][1]) == 2
    assert out["clip_scores"][0][0] == pytest.approx(out["clip_scores"][1][0], abs=1e-6)
    assert out[rows.ROW_ERROR][2] == "InputError: row 'n' field 'text': no text (value is null)"


def test_clip_zero_shot(cache, clip_sim):
    from actors.clip import CLIPScorer

    keywords = ["bar chart", "pie chart", "line chart", "a photo"]
    zs = CLIPScorer(cache["clip"], {"mode": "zero_shot", "keywords": keywords, "num_threads": 1})
    assert tuple(zs.keyword_embeddings.shape) == (4, 32)
    paths = coco_images(4)
    batch = numpy_batch([{"id": f"z{i}", "image": p} for i, p in enumerate(paths)] +
                        [{"id": "zbad", "image": "/nonexistent/x.png"}])
    out = zs(batch)
    sim = clip_sim(numpy_batch([{"id": f"z{i}", "image": p, "text": keywords} for i, p in enumerate(paths)]))
    for i in range(4):
        scores = json.loads(out["keyword_scores"][i])
        assert list(scores) == keywords
        assert out["keyword"][i] == max(scores, key=scores.get)
        np.testing.assert_allclose(list(scores.values()), sim["clip_scores"][i], atol=1e-5)
        alone = zs(single(batch, i))
        assert alone["keyword"][0] == out["keyword"][i]
    assert out["keyword"][4] is None and "image file not found: /nonexistent/x.png" in out[rows.ROW_ERROR][4]
    with pytest.raises(ValueError, match="keywords"):
        CLIPScorer(cache["clip"], {"mode": "zero_shot"})
