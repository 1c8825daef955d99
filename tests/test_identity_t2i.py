"""Identity-conditioned text-to-image (MIRROR step 3d) with the tiny placeholders.

PhotoMaker-v1-style SDXL and IP-Adapter (plain, plus-face) are loaded through the real
``from_pretrained`` / ``load_lora_weights`` / ``load_ip_adapter`` paths. Each row of a batch must
get its own face (a batch of two clients equals the two single calls within 2/255; swapping
the faces changes both rows), seeds come from the row id, PhotoMaker's delayed merge has an
effect, broken faces become row errors, and one run goes through a Ray Data actor pool.
Faces are synthetic images (random blocks / flat colour): the tiny encoders only need
different pixels to give different identities.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from actors.models import resolve
from tests.helpers import numpy_batch, placeholder_models, run_ray
from tests.test_vision import decode
from udfs import rows

PM = {"backend": "diffusers", "model": "placeholder:tiny-sdxl-photomaker"}
IP = {"backend": "diffusers", "model": "placeholder:tiny-sd-ip-adapter"}
FAST = {"height": 64, "width": 64, "num_inference_steps": 3, "output_size": None, "num_threads": 1}


def face_png(kind: int) -> bytes:
    """A synthetic 'face' photo (PNG bytes): random 8 x 8 blocks (kind 0, 2) or a flat colour (1)."""
    if kind == 1:
        arr = np.full((48, 40, 3), (200, 40, 90), dtype=np.uint8)
    else:
        blocks = np.random.default_rng(kind).integers(0, 256, (6, 5, 3), dtype=np.uint8)
        arr = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def client_rows(faces: list) -> list[dict]:
    return [{"id": "dlg-7/turn-1", "prompt": "portrait photo of a woman img, smiling, sad face",
             "negative_prompt": "angry", "face_image": faces[0]},
            {"id": "dlg-9/turn-3", "prompt": "portrait photo of a man img, angry face",
             "negative_prompt": "smiling", "face_image": faces[1]}]


@pytest.fixture(scope="session")
def id_cache(tmp_path_factory):
    """A private model cache (MMSYNTH_CACHE) with both placeholders built once."""
    torch.set_num_threads(1)
    yield from placeholder_models(tmp_path_factory, "idt2i-cache", {"pm": PM, "ip": IP})


@pytest.fixture(scope="session")
def pm(id_cache):
    from actors.identity_t2i import IdentityText2Image

    return IdentityText2Image(id_cache["pm"], FAST)


@pytest.fixture(scope="session")
def ip(id_cache):
    from actors.identity_t2i import IdentityText2Image

    return IdentityText2Image(id_cache["ip"], FAST)


@pytest.fixture(scope="session")
def ip_plus(id_cache):
    from actors.identity_t2i import IdentityText2Image

    model = resolve({**IP, "options": {"adapter_weight_name": "ip-adapter-plus-face_sd15.safetensors"}})
    return IdentityText2Image(model.model_dump(), FAST)


def test_columns_params_and_merge_step():
    from actors.identity_t2i import IdentityText2Image, start_merge_step

    assert IdentityText2Image.columns({}) == (
        ["id", "prompt", "face_image"],
        ["image_png", "seed", "identity_method", "gen_steps", "gen_guidance_scale", "gen_start_merge_step",
         "gen_height", "gen_width"])
    assert IdentityText2Image.columns({"output_dir": "/x", "face_column": "src"})[0][2] == "src"
    p = IdentityText2Image.Params()
    assert (p.num_inference_steps, p.guidance_scale, p.style_strength_ratio, p.output_size) == (50, 5.0, 20.0, 336)
    assert start_merge_step(50, 20) == 10 and start_merge_step(400, 20) == 30 and start_merge_step(3, 20) == 0


def test_placeholders_load_through_the_real_paths(id_cache, pm, ip, ip_plus):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from actors import photomaker_id

    root = Path(id_cache["pm"]["path"])
    ckpt = photomaker_id.read_checkpoint(root / "photomaker" / "photomaker-v1.bin")
    assert sorted(ckpt) == ["id_encoder", "lora_weights"]                     # the official two-key layout
    assert (root / "model_index.json").exists() and type(pm.pipe).__name__ == "StableDiffusionXLPipeline"
    assert "photomaker" in pm.pipe.get_list_adapters()["unet"]                 # LoRA via load_lora_weights
    for tok in (pm.pipe.tokenizer, pm.pipe.tokenizer_2):                       # trigger added to both
        assert "img" in tok.get_added_vocab()
    bad = dict(ckpt["id_encoder"], extra=torch.zeros(1))                       # strict: unexpected key fails
    with pytest.raises(RuntimeError):
        photomaker_id.build_id_encoder(bad, photomaker_id.encoder_config_for(root / "photomaker" / "x.bin"))
    assert pm.placeholder and ip.placeholder and (pm.method, ip.method) == ("photomaker", "ip_adapter")
    assert (ip.ip_variant, ip_plus.ip_variant) == ("plain", "plus")
    ip_root = Path(id_cache["ip"]["path"]) / "ip-adapter" / "models"
    assert {p.name for p in ip_root.iterdir()} == {"image_encoder", "ip-adapter_sd15.safetensors",
                                                   "ip-adapter-plus-face_sd15.safetensors"}
    procs = [type(v) for k, v in ip.pipe.unet.attn_processors.items() if k.endswith("attn2.processor")]
    assert procs and all(c is IPAdapterAttnProcessor2_0 for c in procs)
    text, cls = photomaker_id.split_trigger(pm.pipe.tokenizer_2, "portrait photo of a woman img, smiling")
    assert text == "portrait photo of a woman, smiling"
    tok2 = pm.pipe.tokenizer_2
    # the class token = the token just before the trigger (official rule; the tiny BPE spells "woman" in pieces)
    assert tok2(text).input_ids[cls] == tok2("woman").input_ids[-2]


@pytest.mark.parametrize("which", ["pm", "ip", "ip_plus"])
def test_each_row_gets_its_own_face(which, request):
    actor = request.getfixturevalue(which)
    faces = [face_png(0), face_png(1)]
    both = actor(numpy_batch(client_rows(faces)))
    assert list(both[rows.ROW_ERROR]) == [None, None]
    assert list(both["identity_method"]) == [actor.method] * 2
    for i, row in enumerate(client_rows(faces)):                               # batch == single calls
        alone = actor(numpy_batch([row]))
        assert np.abs(decode(alone["image_png"][0]) - decode(both["image_png"][i])).max() <= 2, (which, i)
    swapped = actor(numpy_batch(client_rows(faces[::-1])))                     # faces swapped, same rows
    for i in range(2):
        assert np.abs(decode(swapped["image_png"][i]) - decode(both["image_png"][i])).max() > 2, (which, i)


def test_stock_ip_adapter_embeds_would_mix_rows(id_cache):
    """The trap the per-row override fixes (notes §6.1): with diffusers' own
    ``prepare_ip_adapter_image_embeds`` the same per-row embeds are tiled for every row and
    the rows no longer match their single calls (measured 20-36/255 with the tiny weights)."""
    from actors.identity_t2i import IdentityText2Image

    actor = IdentityText2Image(id_cache["ip"], FAST)
    batch_rows = client_rows([face_png(0), face_png(1)])
    singles = [decode(actor(numpy_batch([r]))["image_png"][0]) for r in batch_rows]
    del actor.pipe.prepare_ip_adapter_image_embeds                             # back to the stock method
    stock = actor(numpy_batch(batch_rows))
    worst = max(np.abs(decode(stock["image_png"][i]) - singles[i]).max() if stock["image_png"][i] else 255
                for i in range(2))
    assert worst > 2


def test_seed_from_row_id(pm, tmp_path):
    face = tmp_path / "face.png"
    face.write_bytes(face_png(2))
    row = {"id": "dlg-1/turn-2", "prompt": "portrait photo of a man img, calm", "face_image": str(face)}
    a, b = pm(numpy_batch([row])), pm(numpy_batch([row]))
    assert a["image_png"][0] == b["image_png"][0] and a["seed"][0] == rows.seed_from_id("dlg-1/turn-2")
    other = pm(numpy_batch([dict(row, id="dlg-1/turn-4")]))
    assert other["image_png"][0] != a["image_png"][0]
    pinned = pm(numpy_batch([dict(row, id="dlg-1/turn-4", seed=a["seed"][0])]))
    assert pinned["image_png"][0] == a["image_png"][0]                         # the seed column wins


def test_delayed_merge_has_an_effect(id_cache, pm):
    from actors.identity_t2i import IdentityText2Image

    never = IdentityText2Image(id_cache["pm"], {**FAST, "start_merge_step": FAST["num_inference_steps"]})
    batch = numpy_batch(client_rows([face_png(0), face_png(1)]))
    merged, text_only = pm(batch), never(batch)
    assert merged["gen_start_merge_step"][0] == 0 and text_only["gen_start_merge_step"][0] == 3
    for i in range(2):
        assert np.abs(decode(merged["image_png"][i]) - decode(text_only["image_png"][i])).max() > 2, i
    # never merged -> the face has no influence at all
    swapped = never(numpy_batch(client_rows([face_png(1), face_png(0)])))
    assert list(swapped["image_png"]) == list(text_only["image_png"])


def test_bad_faces_and_prompts_are_row_errors(pm, ip, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    good = face_png(0)
    batch = numpy_batch([
        {"id": "ok", "prompt": "portrait photo of a woman img", "face_image": good},
        {"id": "missing", "prompt": "portrait photo of a woman img", "face_image": str(tmp_path / "nope.jpg")},
        {"id": "corrupt", "prompt": "portrait photo of a woman img", "face_image": str(corrupt)},
        {"id": "null", "prompt": "portrait photo of a woman img", "face_image": None},
        {"id": "notrigger", "prompt": "portrait photo of a woman", "face_image": good},
    ])
    out = pm(batch)
    err = dict(zip(out["id"], out[rows.ROW_ERROR]))
    assert err["ok"] is None and out["image_png"][0] is not None
    assert err["missing"].startswith("InputError: row 'missing' field 'face_image': image file not found")
    assert err["corrupt"].startswith("InputError: row 'corrupt' field 'face_image': cannot decode image")
    assert err["null"].startswith("InputError: row 'null' field 'face_image'")
    assert err["notrigger"].startswith("InputError: row 'notrigger' field 'prompt'") and "'img'" in err["notrigger"]
    assert all(out["image_png"][i] is None for i in range(1, 5))
    ip_out = ip(batch)                                                         # IP-Adapter: trigger optional
    assert [e is None for e in ip_out[rows.ROW_ERROR]] == [True, False, False, False, True]


def test_ray_actor_pool_matches_direct_calls(ray_local, id_cache, pm, tmp_path):
    from actors.identity_t2i import IdentityText2Image

    out_dir = tmp_path / "images"
    items = [dict(r, name=f"{r['id'].split('/')[0]}/{r['id'].split('/')[1]}.png")
             for r in client_rows([face_png(0), face_png(1)])]
    items.append({"id": "dlg-9/turn-5", "prompt": "portrait photo of a man img, crying", "face_image": face_png(1),
                  "name": "dlg-9/turn-5.png"})
    for r in items:
        r.setdefault("negative_prompt", None)
    params = {**FAST, "output_size": 336, "output_dir": str(out_dir), "output_name_column": "name"}
    got = run_ray(ray_local, IdentityText2Image, id_cache["pm"], params, items, batch_size=3)
    assert [r[rows.ROW_ERROR] for r in got] == [None] * 3
    direct = pm(numpy_batch(sorted(items, key=lambda r: r["id"])))
    for r, png in zip(got, direct["image_png"]):
        assert r["image"] == str(out_dir / r["name"]) and r["identity_method"] == "photomaker"
        img = Image.open(r["image"])
        assert img.size == (336, 336) and (r["gen_height"], r["gen_width"]) == (336, 336)
        ref = Image.open(io.BytesIO(png)).convert("RGB").resize((336, 336), Image.Resampling.LANCZOS)
        assert np.abs(np.asarray(img.convert("RGB"), dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 2
