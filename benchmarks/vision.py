"""Throughput of the vision stages: text-to-image, Grounding DINO, CLIP.

Tiny mode (default; CPU, the offline placeholders)::

    python benchmarks/vision.py                    # about 2 minutes on 2 cores
    python benchmarks/vision.py --batch-sizes 1 4 8 --rows 16 --ray-batch-size 8

For every stage and batch size it calls the actor directly on the same rows (after one
warm-up batch) and reports images/s (best and median of ``--repeats``). It then runs the
stage as a Ray Data ``map_batches`` actor pool of one on ``--ray-rows`` rows; a thin
subclass stamps each batch's finish time inside the actor, so the steady-state rate
(rows after the first batch / time from the first to the last batch) excludes actor
start, model load and warm-up, and is reported next to the direct rate at the same batch
size (``ray_vs_direct`` = Ray / direct).

Real-size mode (a GPU machine)::

    python benchmarks/vision.py --real-size --dry-run         # prints the plan; CPU is fine
    python benchmarks/vision.py --real-size --t2i-size 1024 --t2i-steps 28 --dino-backbone base

builds random-init models with the *real* architectures (SD3-medium transformer + VAE +
CLIP-L/G + T5-XXL text encoders; Grounding DINO Swin-T or Swin-B with BERT-base; CLIP
ViT-B/32 or ViT-L/14), saves them in their libraries' formats under ``--workdir`` and loads
them through the same actors, then records images/s and ``torch.cuda.max_memory_allocated``
per stage and batch size. Random weights cost the same FLOPs as trained ones.

Results go to ``benchmarks/results/vision-<date>.json`` (tiny) or
``vision-real-size-<date>.json``: figures, configuration and machine description.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import bench_env  # noqa: E402,F401  (first: repository on sys.path, offline defaults)
from bench_env import machine  # noqa: E402

ROOT = Path(bench_env.ROOT)

COCO = ROOT.parent / "shared" / "data" / "captions" / "coco_mini_images"
PROMPTS = ["a (bird house:1.3) covered in (snow:1.2)", "a dog sleeping on a bench", "a red kite in a blue sky",
           "two people playing a game in a kitchen", "a pizza on a plate next to a cup",
           "a bus on a street with traffic lights", "a giraffe next to a tree", "a cat on a couch"]
PHRASES = [(["bird house", "snow"], ["bird", "leaves"]), (["dog", "bench"], ["cat"]),
           (["kite", "sky"], ["bird", "airplane"]), (["people", "game"], ["tv", "dog"])]
TEXTS = [["a photo of a cat", "a dog"], ["a bus"], ["a pizza", "a plate", "a cup"], ["a person"]]


# -- machine and inputs ------------------------------------------------------------------

def input_images(workdir: Path, n: int, size: tuple[int, int] | None) -> list[str]:
    """COCO photos from shared/ (resized to ``size`` as PNG when given: one size, like generated images)."""
    from PIL import Image

    files = sorted(str(p) for p in COCO.glob("*.jpg"))
    if not files:
        raise SystemExit(f"no input images in {COCO}")
    files = (files * (n // len(files) + 1))[:n]
    if size is None:
        return files
    out = []
    d = workdir / f"images-{size[0]}x{size[1]}"
    d.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        p = d / f"{i}.png"
        if not p.exists():
            Image.open(f).convert("RGB").resize(size).save(p)
        out.append(str(p))
    return out


def stage_rows(stage: str, n: int, images: list[str]) -> list[dict]:
    if stage == "text2image":
        return [{"id": f"bench-{i}", "prompt": PROMPTS[i % len(PROMPTS)], "negative_prompt": "blurry"}
                for i in range(n)]
    if stage == "grounding_dino":
        return [{"id": f"bench-{i}", "image": images[i], "present": PHRASES[i % 4][0], "no_exist": PHRASES[i % 4][1]}
                for i in range(n)]
    return [{"id": f"bench-{i}", "image": images[i], "text": TEXTS[i % 4]} for i in range(n)]


def numpy_batch(rows: list[dict]):
    import numpy as np

    out = {}
    for key in rows[0]:
        col = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            col[i] = np.asarray(r[key], dtype=object) if isinstance(r[key], list) else r[key]
        out[key] = col
    return out


# -- stage definitions -------------------------------------------------------------------

def tiny_stages(threads: int) -> dict[str, dict]:
    from actors.clip import CLIPScorer
    from actors.detection import GroundingDINO
    from actors.text2image import Text2Image

    return {
        "text2image": {"cls": Text2Image, "spec": {"backend": "diffusers", "model": "placeholder:tiny-sd3"},
                       "params": {"height": 64, "width": 64, "num_inference_steps": 2, "num_threads": threads},
                       "image_size": None},
        "grounding_dino": {"cls": GroundingDINO,
                           "spec": {"backend": "grounding_dino", "model": "placeholder:tiny-grounding-dino"},
                           "params": {"image_size": 64, "max_size": 96, "num_threads": threads},
                           "image_size": (128, 96)},
        "clip": {"cls": CLIPScorer, "spec": {"backend": "open_clip", "model": "placeholder:tiny-clip"},
                 "params": {"num_threads": threads}, "image_size": None},
    }


def _timed(fn: Callable[[], Any]) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_direct(actor, rows: list[dict], batch_sizes: list[int], repeats: int) -> dict[str, Any]:
    """images/s of direct actor calls per batch size (after one warm-up batch)."""
    import torch

    from udfs import rows as R

    out = {}
    for bs in batch_sizes:
        batches = [numpy_batch(rows[i:i + bs]) for i in range(0, len(rows), bs)]
        actor(batches[0])  # warm-up: lazy kernels, allocator
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times, errors = [], 0
        for _ in range(repeats):
            def run():
                nonlocal errors
                for b in batches:
                    res = actor(b)
                    errors += sum(e is not None for e in res[R.ROW_ERROR])
            times.append(_timed(run))
        entry = {"rows": len(rows), "batches": len(batches), "seconds": [round(t, 4) for t in times],
                 "images_per_s_best": round(len(rows) / min(times), 3),
                 "images_per_s_median": round(len(rows) / statistics.median(times), 3), "row_errors": errors}
        if torch.cuda.is_available():
            entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
        out[str(bs)] = entry
        print(f"  batch {bs}: {entry['images_per_s_best']} images/s (best of {repeats})", flush=True)
    return out


def timed_actor_class(cls):
    """Subclass of an actor class that stamps each output row with the batch's finish time."""
    import numpy as np

    class Timed(cls):
        def __call__(self, batch):
            out = super().__call__(batch)
            out["_bench_done"] = np.full(len(batch["id"]), time.time())
            return out

    Timed.__name__ = Timed.__qualname__ = f"Timed{cls.__name__}"
    return Timed


def bench_ray(stage: dict, model: dict, rows: list[dict], batch_size: int, num_cpus: float,
              num_gpus: float) -> dict[str, Any]:
    """The stage as a Ray Data actor pool of one: end-to-end wall time and steady-state rate.

    The steady-state rate counts the rows of every batch after the first, over the time
    between the first and the last batch's completion (stamped inside the actor), so it
    excludes actor start, model load and first-call warm-up but includes any time the
    actor waits for Ray Data to hand it the next batch.
    """
    import ray
    import ray.data

    env = {k: os.environ[k] for k in ("MMSYNTH_CACHE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "OMP_WAIT_POLICY")
           if k in os.environ}
    ds = ray.data.from_items(rows).map_batches(
        timed_actor_class(stage["cls"]), fn_constructor_kwargs={"model": model, "params": stage["params"]},
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), batch_size=batch_size,
        num_cpus=num_cpus, num_gpus=num_gpus or None, runtime_env={"env_vars": env})
    t0 = time.perf_counter()
    got = ds.take_all()
    wall = time.perf_counter() - t0
    done = sorted(r["_bench_done"] for r in got)
    stamps = sorted(set(done))
    first = stamps[0]
    after_first = sum(1 for t in done if t > first)
    span = stamps[-1] - first
    steady = after_first / span if span > 0 else float("nan")
    return {"batch_size": batch_size, "rows": len(got), "batches": len(stamps), "wall_s": round(wall, 3),
            "steady_images_per_s": round(steady, 3),
            "row_errors": sum(r.get("__row_error__") is not None for r in got)}


# -- real-size models (GPU) --------------------------------------------------------------

def real_size_plan(args) -> dict[str, Any]:
    """Configs of the real-size random-init models (no weights are built here)."""
    t2i = {
        "transformer": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        "vae": dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                    use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305),
        "clip_l": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                       num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"),
        "clip_g": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                       num_hidden_layers=32, projection_dim=1280, hidden_act="gelu"),
        "t5": None if args.no_t5 else dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                           num_heads=64, feed_forward_proj="gated-gelu"),
        "height": args.t2i_size, "width": args.t2i_size, "steps": args.t2i_steps, "guidance_scale": 7.5,
    }
    swin = {"tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                         image_size=224),
            "base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12,
                         image_size=384)}[args.dino_backbone]
    dino = {"backbone": dict(**swin, out_features=["stage2", "stage3", "stage4"]),
            "text": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072),
            "detector": dict(d_model=256, encoder_layers=6, decoder_layers=6, num_queries=900, max_text_len=256),
            "image_size": 800, "max_size": 1333}
    clip = {"arch": args.clip_arch}
    return {"text2image": t2i, "grounding_dino": dino, "clip": clip}


def _count_params(build: Callable[[], Any]) -> int:
    import torch

    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def real_size_param_counts(plan: dict) -> dict[str, int]:
    """Parameter counts of the planned models, built on the meta device (no memory)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import (BertConfig, CLIPTextConfig, CLIPTextModelWithProjection, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, SwinConfig, T5Config, T5EncoderModel)

    t2i, dino = plan["text2image"], plan["grounding_dino"]
    counts = {
        "sd3_transformer": _count_params(lambda: SD3Transformer2DModel(**t2i["transformer"])),
        "sd3_vae": _count_params(lambda: AutoencoderKL(**t2i["vae"])),
        "clip_l_text": _count_params(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**t2i["clip_l"]))),
        "clip_g_text": _count_params(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**t2i["clip_g"]))),
    }
    if t2i["t5"]:
        counts["t5_xxl_encoder"] = _count_params(lambda: T5EncoderModel(T5Config(**t2i["t5"])))
    counts["grounding_dino"] = _count_params(lambda: GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=SwinConfig(**dino["backbone"]), text_config=BertConfig(**dino["text"]), **dino["detector"])))
    try:
        import open_clip

        counts["open_clip_" + plan["clip"]["arch"]] = _count_params(
            lambda: open_clip.create_model(plan["clip"]["arch"], pretrained=None, device="meta"))
    except Exception as exc:  # noqa: BLE001 - open_clip may not build on meta; the count is informative only
        counts["open_clip_" + plan["clip"]["arch"]] = f"not counted: {type(exc).__name__}"
    return counts


def build_real_size(plan: dict, workdir: Path, dtype) -> dict[str, str]:
    """Random-init real-size models saved in their libraries' formats; returns folder per stage."""
    import open_clip
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from safetensors.torch import save_file
    from transformers import (BertConfig, BertTokenizer, CLIPTextConfig, CLIPTextModelWithProjection,
                              GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessor,
                              GroundingDinoProcessor, SwinConfig, T5Config, T5EncoderModel)

    from actors import placeholders as P

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    t2i = plan["text2image"]
    d = workdir / "sd3-medium-size"
    if not (d / "model_index.json").exists():
        tok, tok2 = P.tiny_clip_tokenizer(), P.tiny_clip_tokenizer()
        special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        with torch.device(dev):
            te = CLIPTextModelWithProjection(CLIPTextConfig(**t2i["clip_l"], **special)).to(dtype)
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**t2i["clip_g"], **special)).to(dtype)
            te3 = T5EncoderModel(T5Config(**t2i["t5"])).to(dtype) if t2i["t5"] else None
            tr = SD3Transformer2DModel(**t2i["transformer"]).to(dtype)
            vae = AutoencoderKL(**t2i["vae"]).to(dtype)
        pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                        text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                                        text_encoder_3=te3, tokenizer_3=P.tiny_t5_tokenizer() if te3 else None)
        pipe.save_pretrained(str(d), safe_serialization=True)
        del pipe, te, te2, te3, tr, vae
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["text2image"] = str(d)

    dino = plan["grounding_dino"]
    d = workdir / "grounding-dino-size"
    if not (d / "config.json").exists():
        vocab = P.tiny_bert_vocab()
        vocab.update({f"[unused{i}]": len(vocab) + i for i in range(dino["text"]["vocab_size"] - len(vocab))})
        torch.manual_seed(0)
        cfg = GroundingDinoConfig(backbone_config=SwinConfig(**dino["backbone"]),
                                  text_config=BertConfig(**dino["text"]),
                                  **dino["detector"])
        with torch.device(dev):
            model = GroundingDinoForObjectDetection(cfg)
        model.save_pretrained(str(d))
        GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(
            size={"shortest_edge": dino["image_size"], "longest_edge": dino["max_size"]}),
            tokenizer=BertTokenizer(vocab=vocab, do_lower_case=True)).save_pretrained(str(d))
        del model
    out["grounding_dino"] = str(d)

    arch = plan["clip"]["arch"]
    d = workdir / f"open-clip-{arch}"
    if not (d / "open_clip_model.safetensors").exists():
        d.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(arch),
                                                             "preprocess_cfg": {}}))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    out["clip"] = str(d)
    return out


def real_size_stages(plan: dict, folders: dict[str, str]) -> dict[str, dict]:
    from actors.clip import CLIPScorer
    from actors.detection import GroundingDINO
    from actors.text2image import Text2Image

    t2i = plan["text2image"]
    return {
        "text2image": {"cls": Text2Image, "spec": {"backend": "diffusers", "model": folders["text2image"]},
                       "params": {"height": t2i["height"], "width": t2i["width"], "num_inference_steps": t2i["steps"],
                                  "guidance_scale": t2i["guidance_scale"]}, "image_size": None},
        "grounding_dino": {"cls": GroundingDINO, "spec": {"backend": "grounding_dino",
                                                          "model": folders["grounding_dino"]},
                           "params": {"image_size": 800, "max_size": 1333}, "image_size": (1024, 1024)},
        "clip": {"cls": CLIPScorer, "spec": {"backend": "open_clip", "model": folders["clip"]}, "params": {},
                 "image_size": None},
    }


# -- main --------------------------------------------------------------------------------

def results_path(out_dir: Path, prefix: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{prefix}-{dt.date.today().isoformat()}"
    path, k = out_dir / f"{base}.json", 2
    while path.exists():
        path, k = out_dir / f"{base}-{k}.json", k + 1
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=["text2image", "grounding_dino", "clip"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--rows", type=int, default=16, help="rows per timed pass of the direct calls")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per actor (direct and Ray)")
    ap.add_argument("--ray-batch-size", type=int, default=8)
    ap.add_argument("--ray-rows", type=int, default=64, help="rows through the Ray stage")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray-stage comparison")
    ap.add_argument("--workdir", default=None, help="model cache / inputs folder (default: a temp dir)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--real-size", action="store_true", help="real-size random-init models (meant for a GPU)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--t2i-size", type=int, default=1024, help="real-size: image side in px (SPEC C3: 1024)")
    ap.add_argument("--t2i-steps", type=int, default=28, help="real-size: denoising steps (SPEC C3: 28)")
    ap.add_argument("--no-t5", action="store_true", help="real-size: SD3 without the T5-XXL encoder")
    ap.add_argument("--dino-backbone", choices=["tiny", "base"], default="base",
                    help="real-size: Swin-T (grounding-dino-tiny) or Swin-B (Antidote, SPEC C4)")
    ap.add_argument("--clip-arch", default="ViT-L-14", help="real-size: open_clip architecture (MM-GEN: ViT-L-14)")
    args = ap.parse_args(argv)

    import torch

    real_only = {"t2i_size", "t2i_steps", "no_t5", "dino_backbone", "clip_arch"}
    config = {k: v for k, v in vars(args).items() if args.real_size or k not in real_only}
    if args.real_size:
        plan = real_size_plan(args)
        config["plan"] = plan
        if args.dry_run:
            print(json.dumps({"mode": "real-size", "plan": plan, "param_counts": real_size_param_counts(plan),
                              "cuda_available": torch.cuda.is_available(), "config": config}, indent=2, default=str))
            return 0
        if not torch.cuda.is_available():
            print("warning: --real-size without a GPU will be very slow", file=sys.stderr)
    elif args.dry_run:
        print(json.dumps({"mode": "tiny", "config": config, "stages": list(tiny_stages(args.threads))}, indent=2,
                         default=str))
        return 0

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mmsynth-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["MMSYNTH_CACHE"] = str(workdir / "cache")
    torch.set_num_threads(args.threads)

    from actors.models import materialize, resolve

    if args.real_size:
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        t0 = time.perf_counter()
        folders = build_real_size(plan, workdir / "real", dtype)
        print(f"built real-size models in {time.perf_counter() - t0:.1f} s", flush=True)
        stages = real_size_stages(plan, folders)
        config["param_counts"] = real_size_param_counts(plan)
    else:
        stages = tiny_stages(args.threads)
    results: dict[str, Any] = {"mode": "real-size" if args.real_size else "tiny", "machine": machine(),
                               "config": config, "stages": {}}
    ray_started = False
    for name in args.stages:
        stage = stages[name]
        print(f"{name}:", flush=True)
        images = input_images(workdir, max(args.rows, args.ray_rows), stage["image_size"])
        rows = stage_rows(name, args.rows, images)
        resolved = resolve(stage["spec"])
        t0 = time.perf_counter()
        materialize(resolved)
        build_s = time.perf_counter() - t0
        model = resolved.model_dump()
        t0 = time.perf_counter()
        actor = stage["cls"](model, stage["params"])
        load_s = time.perf_counter() - t0
        entry: dict[str, Any] = {"model": resolved.describe(), "params": stage["params"],
                                 "placeholder_build_s": round(build_s, 3), "load_s": round(load_s, 3),
                                 "direct": bench_direct(actor, rows, args.batch_sizes, args.repeats)}
        del actor
        if not args.no_ray:
            import ray

            if not ray_started:
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
                ray_started = True
            bs = args.ray_batch_size
            ray_entry = bench_ray(stage, model, stage_rows(name, args.ray_rows, images), bs, num_cpus=1,
                                  num_gpus=1 if torch.cuda.is_available() else 0)
            direct_rate = entry["direct"].get(str(bs), {}).get("images_per_s_best")
            if direct_rate:
                ray_entry["direct_images_per_s_same_batch"] = direct_rate
                ray_entry["ray_vs_direct"] = round(ray_entry["steady_images_per_s"] / direct_rate, 3)
            entry["ray"] = ray_entry
            print(f"  ray (batch {bs}, {ray_entry['rows']} rows): {ray_entry['steady_images_per_s']} images/s "
                  f"steady, ratio {ray_entry.get('ray_vs_direct')}, wall {ray_entry['wall_s']} s", flush=True)
        results["stages"][name] = entry
    path = results_path(Path(args.out_dir), "vision-real-size" if args.real_size else "vision")
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
