"""Per-batch time and peak memory of the paper profile's model stages at real size, on one GPU.

For the ``device`` tool (one H100 or H200, 15 device-minutes a task; its image has torch,
transformers and peft, no diffusers, Ray or vLLM: carry the diffusers wheel). Every model is
built **from its published architecture with random weights in bf16** (no hub), so the
figures are compute and memory, not quality:

SD3-medium and SDXL + PhotoMaker at 1024 px, Grounding DINO base, CLIP ViT-L/14 and the
LLaVA-1.5-7B answer loss: what each runs is in ``DESCRIPTIONS`` (and in every result's
``source``). vLLM tokens/s is not measured: the vLLM wheel (336 MB) is over the device tool's
64 MiB carry.

Each stage runs at two batch sizes (1 and the paper recipe's); the JSON gives per-batch
seconds (median of ``--repeat`` after a warm-up), the linear fit ``fixed_s + per_row_s x n``
and the peak GPU memory, in the ``LATENCY`` format that ``benchmarks/scale.py --latency FILE``
reads to replace its published figures. ``--device cpu --tiny`` runs the same code on tiny
configs (a dry run for CI; its figures mean nothing).

    python benchmarks/gpu_stages.py --out gpu.json [--stages sd3,sdxl,dino,clip,llava] [--repeat 3]
    python benchmarks/gpu_stages.py --device cpu --tiny --out /tmp/dry.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch

#: recipe batch sizes of the paper profile (jobs/recipes/*.paper.yaml)
PAPER_BATCH = {"sd3": 4, "sdxl": 2, "dino": 8, "clip": 64, "llava": 8}
DESCRIPTIONS = {
    "sd3": "SD3-medium's MMDiT (24 layers, 24 heads x 64, joint 4096, 16 latent channels) and VAE; 1024 x 1024, "
           "28 flow-matching steps with classifier-free guidance (the transformer sees twice the batch), then the "
           "VAE decode. The three text encoders (CLIP-L, CLIP-G, T5-XXL) run once per image and are left out "
           "(random prompt embeddings of their output shapes: 333 tokens x 4096, pooled 2048).",
    "sdxl": "the SDXL UNet (RealVisXL V3.0 is an SDXL fine-tune) and VAE at 1024 x 1024, 50 DDIM steps with "
            "guidance, plus PhotoMaker's ID encoder (a CLIP ViT-L/14 image tower over the source face, once per "
            "image); text encoders left out (77 x 2048 embeddings).",
    "dino": "Grounding DINO with the Swin-B backbone and BERT-base text encoder, 800 x 800 images, a 24-token "
            "phrase prompt.",
    "clip": "CLIP ViT-L/14 image and text towers (224 px, 77 tokens).",
    "llava": "LLaVA-1.5-7B (CLIP ViT-L/14-336 + Llama-2-7B shapes) forward pass with labels (MM-GEN's answer "
             "loss): 576 image tokens + 128 text tokens per sample.",
}
MODEL_IDS = {"sd3": "stabilityai/stable-diffusion-3-medium-diffusers", "sdxl": "SG161222/RealVisXL_V3.0",
             "dino": "IDEA-Research/grounding-dino-base", "clip": "openai/clip-vit-large-patch14",
             "llava": "llava-hf/llava-1.5-7b-hf"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _sd3(device, dtype, tiny: bool) -> Callable[[int], None]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    if tiny:
        tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                   pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16)
        vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=16,
                            norm_num_groups=1)
        side, tokens, joint, pooled, steps = 16, 8, 32, 32, 2
    else:  # SD3-medium's published config (transformer/config.json, vae/config.json)
        tr = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            use_quant_conv=False, use_post_quant_conv=False)
        side, tokens, joint, pooled, steps = 128, 333, 4096, 2048, 28
    tr, vae = tr.to(device, dtype).eval(), vae.to(device, dtype).eval()
    sched = FlowMatchEulerDiscreteScheduler()

    @torch.inference_mode()
    def run(n: int) -> None:
        sched.set_timesteps(steps, device=device)
        lat = torch.randn(n, 16, side, side, device=device, dtype=dtype)
        emb = torch.randn(2 * n, tokens, joint, device=device, dtype=dtype)
        pool = torch.randn(2 * n, pooled, device=device, dtype=dtype)
        for t in sched.timesteps:
            out = tr(hidden_states=torch.cat([lat, lat]), timestep=t.expand(2 * n), encoder_hidden_states=emb,
                     pooled_projections=pool).sample
            uncond, cond = out.chunk(2)
            lat = sched.step(uncond + 7.5 * (cond - uncond), t, lat).prev_sample
        vae.decode(lat)
    return run


def _sdxl(device, dtype, tiny: bool) -> Callable[[int], None]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if tiny:
        unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=80, use_linear_projection=True)
        vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                            norm_num_groups=1)
        face = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=32, patch_size=16))
        side, ctx, pooled, steps, face_px = 16, 32, 32, 2, 32
    else:  # SDXL base's published UNet config; RealVisXL V3.0 is a fine-tune of it
        unet = UNet2DConditionModel(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                                    block_out_channels=(320, 640, 1280),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                    cross_attention_dim=2048, addition_embed_type="text_time",
                                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                                    use_linear_projection=True)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4)
        face = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                num_attention_heads=16, image_size=224, patch_size=14))
        side, ctx, pooled, steps, face_px = 128, 2048, 1280, 50, 224
    unet, vae, face = (m.to(device, dtype).eval() for m in (unet, vae, face))
    sched = DDIMScheduler(steps_offset=1, clip_sample=False)

    @torch.inference_mode()
    def run(n: int) -> None:
        face(pixel_values=torch.randn(n, 3, face_px, face_px, device=device, dtype=dtype))  # PhotoMaker ID tower
        sched.set_timesteps(steps, device=device)
        lat = torch.randn(n, 4, side, side, device=device, dtype=dtype)
        emb = torch.randn(2 * n, 77, ctx, device=device, dtype=dtype)
        added = {"text_embeds": torch.randn(2 * n, pooled, device=device, dtype=dtype),
                 "time_ids": torch.randn(2 * n, 6, device=device, dtype=dtype)}
        for t in sched.timesteps:
            out = unet(torch.cat([lat, lat]), t, encoder_hidden_states=emb, added_cond_kwargs=added).sample
            uncond, cond = out.chunk(2)
            lat = sched.step(uncond + 5.0 * (cond - uncond), t, lat).prev_sample
        vae.decode(lat)
    return run


def _dino(device, dtype, tiny: bool) -> Callable[[int], None]:
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    if tiny:
        backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                              window_size=4, out_indices=[2, 3, 4])
        text = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64)
        cfg = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                  decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
                                  decoder_attention_heads=2, num_queries=20, max_text_len=32)
        px, vocab = 128, 64
    else:  # grounding-dino-base: Swin-B (384, window 12) + BERT-base, 900 queries
        backbone = SwinConfig(image_size=384, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2],
                              num_heads=[4, 8, 16, 32], window_size=12, out_indices=[2, 3, 4])
        cfg = GroundingDinoConfig(backbone_config=backbone)
        px, vocab = 800, cfg.text_config.vocab_size
    model = GroundingDinoForObjectDetection(cfg).to(device, dtype).eval()

    @torch.inference_mode()
    def run(n: int) -> None:
        ids = torch.randint(1000 % vocab, vocab, (n, 24), device=device)
        model(pixel_values=torch.randn(n, 3, px, px, device=device, dtype=dtype), input_ids=ids,
              attention_mask=torch.ones_like(ids), pixel_mask=torch.ones(n, px, px, device=device, dtype=torch.long))
    return run


def _clip(device, dtype, tiny: bool) -> Callable[[int], None]:
    from transformers import CLIPConfig, CLIPModel

    if tiny:
        cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                      "num_attention_heads": 2}, projection_dim=16,
                         vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "image_size": 32, "patch_size": 16})
        px = 32
    else:  # ViT-L/14 (openai/clip-vit-large-patch14 config)
        cfg = CLIPConfig(text_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                      "num_attention_heads": 12}, projection_dim=768,
                         vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                        "num_attention_heads": 16, "image_size": 224, "patch_size": 14})
        px = 224
    model = CLIPModel(cfg).to(device, dtype).eval()

    @torch.inference_mode()
    def run(n: int) -> None:
        ids = torch.randint(0, cfg.text_config.vocab_size, (n, 77), device=device)
        model(input_ids=ids, pixel_values=torch.randn(n, 3, px, px, device=device, dtype=dtype))
    return run


def _llava(device, dtype, tiny: bool) -> Callable[[int], None]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=16)
        text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4)
        image_tokens, text_tokens = 4, 16
    else:  # llava-1.5-7b: CLIP ViT-L/14-336 + Llama-2-7B shapes, 576 image tokens
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14)
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
        image_tokens, text_tokens = 576, 128
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size - 1,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            model = LlavaForConditionalGeneration(cfg).eval()  # random init on the device, in bf16
        finally:
            torch.set_default_dtype(torch.float32)

    @torch.inference_mode()
    def run(n: int) -> None:
        ids = torch.randint(0, text.vocab_size - 1, (n, image_tokens + text_tokens), device=device)
        ids[:, 1:1 + image_tokens] = cfg.image_token_index
        labels = ids.clone()
        labels[:, :1 + image_tokens] = -100
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
              pixel_values=torch.randn(n, 3, vision.image_size, vision.image_size, device=device, dtype=dtype))
    return run


BUILDERS: dict[str, Callable] = {"sd3": _sd3, "sdxl": _sdxl, "dino": _dino, "clip": _clip, "llava": _llava}


def measure(name: str, device: torch.device, dtype, tiny: bool, repeat: int) -> dict[str, Any]:
    """Build one stage, time it at batch 1 and the paper batch, fit ``fixed_s + per_row_s x n``."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run = BUILDERS[name](device, dtype, tiny)
    build_s = time.perf_counter() - t0
    sizes = sorted({1, PAPER_BATCH[name]})
    batch_s = {}
    for n in sizes:
        run(n)  # warm-up (kernels, allocator)
        _sync(device)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            run(n)
            _sync(device)
            times.append(time.perf_counter() - t)
        batch_s[n] = statistics.median(times)
    lo, hi = sizes[0], sizes[-1]
    per_row = max(0.0, (batch_s[hi] - batch_s[lo]) / (hi - lo)) if hi > lo else batch_s[lo]
    fixed = max(0.0, batch_s[lo] - per_row * lo)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return {"kind": "gpu", "fixed_s": round(fixed, 4), "per_row_s": round(per_row, 4),
            "batch_s": {str(k): round(v, 4) for k, v in batch_s.items()},
            "rows_per_s_at_paper_batch": round(hi / batch_s[hi], 3), "peak_memory_gib": None if peak is None
            else round(peak, 2), "build_s": round(build_s, 1), "tiny": tiny}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON to write (the LATENCY format of benchmarks/scale.py)")
    ap.add_argument("--stages", default=",".join(BUILDERS), help=f"comma-separated of {', '.join(BUILDERS)}")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny configs (a dry run of the code; figures mean nothing)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: use --device cpu --tiny for a dry run")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    basis = f"measured: {gpu or 'CPU'}, random weights, {str(dtype).split('.')[-1]}" + (" (tiny dry run)" if args.tiny else "")
    stages: dict[str, dict] = {}
    for name in [s.strip() for s in args.stages.split(",") if s.strip()]:
        if name not in BUILDERS:
            raise SystemExit(f"unknown stage {name!r} (choose from {', '.join(BUILDERS)})")
        try:
            m = measure(name, device, dtype, args.tiny, args.repeat)
            m.update(basis=basis, source=f"benchmarks/gpu_stages.py {name}: {DESCRIPTIONS[name]}")
        except torch.cuda.OutOfMemoryError as e:
            m = {"kind": "gpu", "error": f"OutOfMemoryError: {e}"[:300], "basis": basis}
        stages[MODEL_IDS[name]] = m
        print(name, json.dumps(m)[:300], flush=True)
    doc = {"benchmark": "gpu_stages", "date": time.strftime("%Y-%m-%d"),
           "machine": {"gpu": gpu, "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
                       if gpu else None, "torch": torch.__version__, "python": platform.python_version(),
                       "cpus": os.cpu_count()},
           "vllm": "not measured: the vLLM wheel (336 MB) exceeds the device tool's 64 MiB carry",
           "latency": stages}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    return doc


if __name__ == "__main__":
    main()
