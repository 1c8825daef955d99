"""MIRROR dataset construction on Ray Data: face pool + Cactus clients → counselling
screenplays with one generated client face image per client turn, filtered (SPEC part A).

One Ray job replaces the original's four steps, its notebooks and its hand-split GPU lists.
The rows change granularity, so the job runs four phases (``jobs.core.driver.Phase``), each with
its own committed rows and funnel:

1. ``faces`` (step 1): one row per face-pool image; the face pass (``actors.faces``) gives age,
   gender, emotion and an identity embedding; images without exactly one face are rejected
   (the original skipped them silently). ``--drop-duplicated`` keeps one image per identity
   (first by file name).
2. ``clients``: one row per distinct Cactus client (later copies are rejected as duplicates).
   Record completion fills what the bundled records lack, each value marked in
   ``derived_fields``: the distorted thought (LLM; rule-based fallback from the presenting
   problem), the thinking traps (LLM, CBT-Bench's ten labels) and a numbered CBT plan (LLM,
   expanding ``ground_truth_cbt`` or choosing one of SPEC B4's twelve techniques). Records
   still without a numbered plan are rejected.
3. ``dialogues`` (step 2): client × resistance trait, id ``cactus-{row}-{trait}``. **Identity
   assignment** (never released upstream, SPEC A3; ``udfs.mirror_identity.assign_identities``): each
   dialogue gets a pool identity of the client's gender (intake form) and nearest age group
   (``round(age/10)*10``), chosen deterministically from the dialogue id and spreading
   dialogues evenly over the candidates; a pool without that gender or age group gives the
   nearest identity and the row records the mismatch in ``identity_mismatch``. Then the
   screenplay LLM (optionally constrained by a line regex), the line parser (original
   fallbacks), the dialogue filters (turn count, speakers, word repetition, response failure,
   POS repetition, copy-paste) and Canary dialogue safety on therapist lines.
4. ``turns`` (step 3 + image filters of step 4): one row per client turn. The LLM writes the
   aligned and the contrasting facial expression; the identity-conditioned generator draws
   the client from the dialogue's source face (prompt: portrait + realism tags + aligned;
   negative: standard negatives + contrasting; seed from the row id; ``OUT/images/
   <dialogue_id>/turn-<t>.png``); one face pass, one CLIP score and one NSFW score per image
   feed ``image_filters`` (exactly one face, gender, |Δage| ≤ 10, identity, CLIP ≥ 0.2, NSFW).

A dialogue is kept only if it and every one of its client turns passed; the dialogue rejects
record names every failing filter and turn. Filters fed by placeholder models, or by images a
placeholder generator made, run in audit mode (verdicts in ``_audit``, not applied).

Outputs: ``OUT/faces.parquet`` (proc_celeba columns), ``OUT/mirror_data.csv`` and ``.parquet``
(the original mirror_data columns + ``identity``, ``img_path``, ``age``, ``dominant_gender``),
``OUT/expressions.parquet`` (per client turn: descriptions, prompts, seed, image path, every
filter score), ``OUT/images/``, ``rejects/`` (per phase, plus ``dialogues.jsonl``),
``errors/``, ``manifest.json`` (funnel per phase; the dialogue-level drops per stage and every
dialogue and image filter with its count, whether it ran and whether in audit mode).
"""
from __future__ import annotations

import io as _io
import json
import sys
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from pydantic import BaseModel, Field, field_validator, model_validator

from jobs.core.driver import Phase, plan
from jobs.core.recipe import Recipe
from jobs.core.report import Gallery
from jobs.core.runtime import Stage, llm_stage
from jobs.core.store import write_table
from udfs import faces as F
from udfs import io
from udfs import mirror_completion as completion
from udfs import mirror_identity as identity
from udfs import mirror_intake as intake
from udfs import mirror_screenplay as screenplay
from udfs import mirror_dialogue as MD
from udfs import mirror_images as MI
from udfs import rows as R
from udfs import safety as S

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ScreenplayBounds(BaseModel):
    """Bounds of the screenplay line regex (``udfs.mirror_screenplay.screenplay_regex``)."""

    min_pairs: int = Field(4, ge=1, description="Fewest Therapist/Client pairs (MIRROR turn filter: 4).")
    max_pairs: int = Field(20, ge=1, description="Most pairs (MIRROR turn filter: 20).")
    max_direction: int = Field(40, ge=2, description="Longest stage direction, characters.")
    max_statement: int = Field(200, ge=2, description="Longest statement, characters.")


class MirrorRecipe(Recipe):
    """MIRROR recipe: inputs and the pipeline's own settings, plus the stages below."""

    faces: str | None = Field(None, description="Face pool: a folder with labels.csv (file, identity), or "
                              "CelebA's CSV (image, identity[, Male, Young]) beside/with an image folder")
    face_images: str | None = Field(None, description="Image folder of a CelebA CSV (default: the CSV's folder, "
                                    "or its img_align_celeba/ subfolder when present)")
    drop_duplicated: bool = Field(False, description="Keep one pool image per identity, first by file name "
                                  "(MIRROR step 1 --drop_duplicated)")
    traits: list[str] = Field(list(screenplay.RESISTANCE_TRAITS), min_length=1,
                              description="Resistance traits crossed with every client (MIRROR: all four)")
    screenplay_prompt: dict[str, Any] = Field(default_factory=screenplay.default_screenplay_prompt,
                                              description="System prompt, few-shot pairs and length rule "
                                              "(udfs.mirror_screenplay.default_screenplay_prompt shape; our wording)")
    screenplay_constraint: ScreenplayBounds | None = Field(
        None, description="Constrain screenplay decoding to Therapist/Client lines (regex; transformers/vLLM "
        "guided decoding, validation elsewhere). Small local models need it: SmolLM2 lines parse 49% of the "
        "time free-sampled, 100% constrained (mirror-text notes).")
    image_trigger: str = Field("img", description="PhotoMaker trigger word after the class word ('' for "
                               "IP-Adapter)")

    def input_uris(self) -> dict[str, list[str]]:
        """``--input``, the face pool ``--faces`` and ``--face-images`` when given."""
        return {**super().input_uris(), "--faces": [self.faces] if self.faces else [],
                "--face-images": [self.face_images] if self.face_images else []}

    @model_validator(mode="after")
    def _needs_faces(self):
        if self.input and not self.faces:
            raise ValueError("faces: a face pool is required (--faces FOLDER_OR_CSV)")
        return self

    @model_validator(mode="after")
    def _one_face_model(self):
        """The pool's identity embeddings (``face_pool``) and the generated images'
        (``face_check``) are compared by cosine: they must come from one face model (backend
        and model), or every turn fails on embedding length (dlib 128-d, VGG-Face 4096-d) or
        compares vectors of different spaces. Checked when the recipe is loaded, so a run or
        ``--dry-run`` refuses before anything starts."""
        specs = {}
        for name in ("face_pool", "face_check"):
            cfg = self.stages.get(name)
            if cfg is not None and cfg.enabled and cfg.model is not None:
                specs[name] = (cfg.model.backend, cfg.model.model)
        if len(specs) == 2 and specs["face_pool"] != specs["face_check"]:
            shown = {k: f"{b}:{m}" for k, (b, m) in specs.items()}
            raise ValueError(f"face_pool uses {shown['face_pool']} but face_check uses {shown['face_check']}: "
                             "both must name the same face backend and model (their identity embeddings are "
                             "compared)")
        return self

    @field_validator("traits")
    @classmethod
    def _known_traits(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in screenplay.RESISTANCE_TRAITS]
        if unknown:
            raise ValueError(f"unknown resistance traits {unknown}; known: {list(screenplay.RESISTANCE_TRAITS)}")
        return v


RECIPE = MirrorRecipe
#: the run report's gallery: per client turn, the generated face with the image-filter scores
REPORT = Gallery(phase="turns", image="image", text=("statement", "stage_direction", "aligned_expression"),
                 scores=("face_count", "gender", "age", "identity_similarity", "clip_score", "nsfw_score"))


def _row(batch: dict, i: int) -> dict[str, Any]:
    return {k: v[i] for k, v in batch.items()}


def _rows(batch: dict) -> list[dict[str, Any]]:
    return [_row(batch, i) for i in range(len(batch[R.ID]))]


# ------------------------------------------------------------------ phase 1: faces

def ingest_faces(recipe: MirrorRecipe, previous: dict) -> tuple[pa.Table, list[dict], int]:
    recs, rejects, left_out = identity.read_face_pool(recipe.faces, recipe.face_images, recipe.drop_duplicated)
    schema = pa.schema([("id", pa.string()), ("image", pa.string()), ("img_path", pa.string()),
                        ("identity", pa.string()), ("celeb_male", pa.int64()), ("celeb_young", pa.int64())])
    return pa.Table.from_pylist(recs, schema=schema), rejects, left_out


def face_stages(recipe: MirrorRecipe) -> list[Stage]:
    return [Stage("face_pool", "actors.faces:FaceAnalyzer"),
            Stage("face_pool_single", F.face_presence_filter, ("face_count",), (), filter=True,
                  evidence=("face_pool",), params_model=F.FacePresenceParams)]


# ------------------------------------------------------------------ phase 2: clients

CLIENT_FIELDS = ("row_index", "client_key", "name", "age", "gender", "face_gender", "age_group", "personal_info",
                 "client_persona", "presenting_problem", "reason_counseling", "thought", "patterns",
                 "cbt_techniques", "cbt_plan", "derived_fields", "missing_fields")
_CLIENT_SCHEMA = pa.schema([("id", pa.string()), ("row_index", pa.int64()), ("client_key", pa.string()),
                            ("name", pa.string()), ("age", pa.float64()), ("gender", pa.string()),
                            ("face_gender", pa.string()), ("age_group", pa.int64()), ("personal_info", pa.string()),
                            ("client_persona", pa.string()), ("presenting_problem", pa.string()),
                            ("reason_counseling", pa.string()), ("thought", pa.string()),
                            ("patterns", pa.list_(pa.string())), ("cbt_techniques", pa.list_(pa.string())),
                            ("cbt_plan", pa.string()), ("derived_fields", pa.list_(pa.string())),
                            ("missing_fields", pa.list_(pa.string()))])


def ingest_clients(recipe: MirrorRecipe, previous: dict) -> tuple[pa.Table, list[dict], int]:
    """One row per distinct client (``udfs.mirror_intake.client_record``); unreadable intake forms and
    later copies of a client are rejects; ``--limit`` keeps the first N distinct clients."""
    records, rejects = io.read_records(recipe.input, "clients:ingest")
    good = []
    for idx, raw in records:
        try:
            good.append(intake.client_record(raw, idx))
        except (intake.IntakeFormError, ValueError, TypeError) as e:
            rejects.append({"id": str(raw.get("id") or f"cactus-{idx}"), "stage": "clients:ingest",
                            "reason": f"row {idx} field 'intake_form': {e}"})
    verdicts = intake.dedupe_clients([g["client_id"] for g in good], [g["client_key"] for g in good])
    distinct = []
    for g, v in zip(good, verdicts):
        if v:
            rejects.append({"id": g["client_id"], "stage": "clients:ingest", "reason": v})
        else:
            distinct.append(g)
    n = recipe.limit or len(distinct)
    rows_ = [{"id": g["client_id"], **{k: g[k] for k in CLIENT_FIELDS}} for g in distinct[:n]]
    return pa.Table.from_pylist(rows_, schema=_CLIENT_SCHEMA), rejects, len(distinct) - len(rows_)


def _missing(r: dict, field: str) -> bool:
    return field in (r.get("missing_fields") or [])


def thought_prompts(batch: dict, params: Any) -> dict:
    """Messages for the distorted-thought call; None (no call) for records that have one."""
    return {"messages": [completion.thought_messages(r) if _missing(r, "thought") else None for r in _rows(batch)]}


def _parsed(value: Any) -> dict | None:
    return json.loads(value) if isinstance(value, str) and value else None


def distortion_prompts(batch: dict, params: Any) -> dict:
    """Messages for the thinking-trap call; None (no call) for records that have patterns."""
    msgs = []
    for r in _rows(batch):
        if not _missing(r, "patterns"):
            msgs.append(None)
            continue
        reply = _parsed(r.get("thought_llm_parsed"))
        thought = r.get("thought") or (reply or {}).get("thought") or completion.heuristic_thought(r["presenting_problem"]) \
            or r["presenting_problem"]
        msgs.append(completion.distortion_messages(thought, r.get("presenting_problem") or ""))
    return {"messages": msgs}


def _completed(r: dict) -> dict:
    """The record with thought and patterns filled from the replies (or the rule fallback)."""
    thought, method = None, "llm"
    reply = _parsed(r.get("thought_llm_parsed"))
    if reply:
        try:
            thought = completion.validate_thought(reply["thought"])
        except ValueError:
            thought = None
    if thought is None:
        thought, method = completion.heuristic_thought(r.get("presenting_problem") or ""), "heuristic"
    rec = completion.apply_completion(r, thought=thought, method=method)
    try:
        rec = completion.apply_completion(rec, patterns=completion.parse_distortions(r.get("distortions_llm_parsed") or ""))
    except ValueError:
        pass
    return rec


def plan_prompts(batch: dict, params: Any) -> dict:
    """Messages for the plan call (the record's technique fixed when it names one); None (no
    call) for records that have a numbered plan."""
    msgs = []
    for r in _rows(batch):
        if not _missing(r, "cbt_plan"):
            msgs.append(None)
            continue
        rec = _completed(r)
        techniques = list(rec.get("cbt_techniques") or [])
        msgs.append(completion.plan_messages(rec, techniques[0] if techniques else None))
    return {"messages": msgs}


class CompletionParams(BaseModel):
    """Params of ``complete_records``."""

    template_fallback: bool = Field(True, description="When the LLM gives no valid plan, use "
                                    "udfs.mirror_completion.template_plan for the record's technique (ground_truth_cbt, else "
                                    "the fallback technique), marked cbt_plan:template; false: such records are "
                                    "rejected by plan_check.")


def complete_records(batch: dict, params: CompletionParams) -> dict:
    """Fill thought, patterns, technique and plan (``apply_completion``; every value marked in
    ``derived_fields`` as ``<field>:llm|heuristic|template``). A record's technique and plan
    always belong together: a source plan keeps the source's technique (Cactus
    ``cbt_technique``) or none, never the LLM's; a written plan must be for the record's
    technique when it names one (else the template plan for that technique)."""
    out: dict[str, list] = {k: [] for k in ("thought", "patterns", "cbt_techniques", "cbt_plan",
                                            "derived_fields", "missing_fields")}
    for r in _rows(batch):
        rec = _completed(r)
        if not _missing(rec, "cbt_plan"):  # the source plan, with the source's technique or none
            for k in out:
                out[k].append(rec.get(k))
            continue
        techniques = list(rec.get("cbt_techniques") or [])
        reply = r.get("plan_llm_parsed") or ""
        try:  # a reply planning another technique than the record's is not used (issue 18 item 2)
            technique, plan = completion.plan_from_reply(reply, techniques[0] if techniques else None)
        except ValueError:
            technique, plan = None, None
        if plan:
            rec = completion.apply_completion(rec, technique=technique, plan=plan)
        elif techniques or params.template_fallback:  # no valid plan from the LLM: generic outline
            technique = techniques[0] if techniques else completion.FALLBACK_TECHNIQUE
            rec = completion.apply_completion(rec, technique=technique, plan=completion.template_plan(technique, rec.get("thought")),
                                     method="template")
        for k in out:
            out[k].append(rec.get(k))
    return out


def _completion_llm(name: str, schema: str) -> Stage:
    """A record-completion LLM stage (``llm_stage``, not a filter); its rows without messages
    (the field is already in the record) make no call (``actors.llm.LLMStage``)."""
    return llm_stage(name, schema, filter=False)


def client_stages(recipe: MirrorRecipe) -> list[Stage]:
    return [
        Stage("thought_prompts", thought_prompts, ("presenting_problem", "reason_counseling"), ("messages",)),
        _completion_llm("thought_llm", "udfs.mirror_completion:DistortedThoughtReply"),
        Stage("distortion_prompts", distortion_prompts, ("presenting_problem", "thought_llm_parsed"), ("messages",)),
        _completion_llm("distortions_llm", "udfs.mirror_completion:DistortionReply"),
        Stage("plan_prompts", plan_prompts, ("client_persona", "distortions_llm_parsed"), ("messages",)),
        _completion_llm("plan_llm", "udfs.mirror_completion:CbtPlanReply"),
        Stage("complete_records", complete_records, ("plan_llm_parsed", "missing_fields"),
              ("thought", "patterns", "cbt_techniques", "cbt_plan", "derived_fields", "missing_fields"),
              params_model=CompletionParams),
        Stage("plan_check", intake.plan_filter, ("cbt_plan",), ("has_numbered_plan",), filter=True,
              params_model=intake.PlanFilterParams),
    ]


# ------------------------------------------------------------------ phase 3: dialogues

SOURCE_COLUMNS = ("identity", "img_path", "source_image", "source_gender", "source_age",
                  "source_identity_embedding", "source_emotion", "identity_mismatch")


def _ok(table: pa.Table | None) -> list[dict]:
    if table is None or table.num_rows == 0:
        return []
    return table.filter(pc.equal(table.column(R.STATUS), R.OK)).to_pylist()


def ingest_dialogues(recipe: MirrorRecipe, previous: dict) -> tuple[pa.Table, list[dict], int]:
    """Client × trait rows with their assigned pool identity (module docstring, step 3)."""
    clients = _ok(previous["clients"])
    # the first image of an identity (by img_path, as read_face_pool orders the pool) is its
    # source face; never Ray Data's output order
    pool = [{"identity": f["identity"], "gender": f["gender"], "age": f["age"], "face": f}
            for f in sorted(_ok(previous["faces"]), key=lambda f: (str(f["img_path"]), str(f[R.ID])))]
    dialogues = []
    for c in clients:
        rec = {k: c[k] for k in CLIENT_FIELDS}
        rec["client_id"] = c["id"]
        for t in recipe.traits:
            dialogues.extend(screenplay.screenplay_rows(rec, [t]))
    if dialogues and not pool:
        raise ValueError("the face pool has no usable image (every image was rejected); see rejects/faces.jsonl")
    assigned = identity.assign_identities([{"id": d[R.ID], "gender": d["face_gender"] or d["gender"], "age": d["age"]}
                                    for d in dialogues], pool) if dialogues else []
    out = []
    for d, a in zip(dialogues, assigned):
        face = a["identity_record"]["face"]
        out.append({**d,
                    "identity": a["identity"], "img_path": face["img_path"], "source_image": face["image"],
                    "source_gender": face["gender"], "source_age": face["age"],
                    "source_identity_embedding": face["identity_embedding"], "source_emotion": face["emotion"],
                    "identity_mismatch": a["identity_mismatch"]})
    if not out:
        return pa.table({"id": pa.array([], pa.string())}), [], 0
    return pa.Table.from_pylist(out), [], 0


def screenplay_prompts_fn(prompt: dict):
    def screenplay_prompts(batch: dict, params: Any) -> dict:
        return {"messages": [screenplay.screenplay_messages(r, r["resistance_slug"], prompt) for r in _rows(batch)]}
    return screenplay_prompts


def parse_screenplays(batch: dict, params: Any) -> dict:
    """``dialogue`` (raw text), ``proc_dialogue`` (list of {speaker, stage_direction,
    statement}), ``unparsed_lines`` and ``turn`` (= len(proc_dialogue) // 2, the original's)."""
    out: dict[str, list] = {"dialogue": [], "proc_dialogue": [], "unparsed_lines": [], "turn": []}
    for r in _rows(batch):
        text = r.get("screenplay_text") or ""
        turns, bad = screenplay.parse_screenplay(text, r.get("name") or None)
        out["dialogue"].append(text)
        out["proc_dialogue"].append(turns)
        out["unparsed_lines"].append(bad)
        out["turn"].append(len(turns) // 2)
    return out


def dialogue_stages(recipe: MirrorRecipe) -> list[Stage]:
    regex = {}
    if recipe.screenplay_constraint is not None:
        regex = {"regex": screenplay.screenplay_regex(**recipe.screenplay_constraint.model_dump())}
    return [
        Stage("screenplay_prompts", screenplay_prompts_fn(recipe.screenplay_prompt),
              ("client_persona", "resistance_slug"), ("messages",)),
        llm_stage("screenplay", **regex),
        Stage("parse_screenplay", parse_screenplays, ("screenplay_text",),
              ("dialogue", "proc_dialogue", "unparsed_lines", "turn")),
        Stage("dialogue_filters", MD.dialogue_filters, ("dialogue", "proc_dialogue"),
              (*MD.SCORE_COLUMNS.values(), "dialogue_filter_failures"), filter=True,
              params_model=MD.DialogueFilterParams),
        Stage("dialogue_safety", "actors.safety:DialogueSafetyClassifier",
              defaults={"utterances_column": "proc_dialogue"}),
        Stage("safety_check", S.safety_filter, ("safety_labels", "safety_speakers"), ("safety_flagged",),
              filter=True, evidence=("dialogue_safety",), params_model=S.SafetyFilterParams),
    ]


# ------------------------------------------------------------------ phase 4: client turns

def ingest_turns(recipe: MirrorRecipe, previous: dict) -> tuple[pa.Table, list[dict], int]:
    """One row per client turn of every dialogue that passed phase 3, with its history."""
    out = []
    for d in _ok(previous["dialogues"]):
        turns = d["proc_dialogue"] or []
        for t, turn in enumerate(turns):
            if turn.get("speaker") != "Client":
                continue
            out.append({"id": f"{d['id']}-turn-{t:02d}", "dialogue_id": d["id"], "turn": t,
                        "stage_direction": turn.get("stage_direction"), "statement": turn.get("statement"),
                        "history": json.dumps(turns[:t], ensure_ascii=False),
                        "image_name": f"{d['id']}/turn-{t}.png",
                        **{k: d[k] for k in SOURCE_COLUMNS}})
    if not out:
        return pa.table({"id": pa.array([], pa.string())}), [], 0
    return pa.Table.from_pylist(out), [], 0


def expression_prompts(batch: dict, params: Any) -> dict:
    return {"messages": [MI.expression_messages(json.loads(r["history"]),
                                                {"speaker": "Client", "stage_direction": r["stage_direction"],
                                                 "statement": r["statement"]}) for r in _rows(batch)]}


def image_prompts_fn(trigger: str):
    def image_prompts(batch: dict, params: Any) -> dict:
        out: dict[str, list] = {"prompt": [], "negative_prompt": [], "clip_text": [], "aligned_expression": [],
                                "contrasting_expression": []}
        for r in _rows(batch):
            reply = json.loads(r["expression_parsed"])
            pos, neg = MI.image_prompt(r["source_gender"], reply["aligned"], reply["contrasting"], trigger)
            out["prompt"].append(pos)
            out["negative_prompt"].append(neg)
            out["clip_text"].append(MI.clip_text(r["stage_direction"]))
            out["aligned_expression"].append(reply["aligned"])
            out["contrasting_expression"].append(reply["contrasting"])
        return out
    return image_prompts


def turn_stages(recipe: MirrorRecipe) -> list[Stage]:
    images = io.join(recipe.output or "OUT", "images")
    return [
        Stage("expression_prompts", expression_prompts, ("history", "stage_direction", "statement"), ("messages",)),
        llm_stage("expression", "udfs.mirror_images:ExpressionReply"),
        Stage("image_prompts", image_prompts_fn(recipe.image_trigger), ("expression_parsed", "source_gender"),
              ("prompt", "negative_prompt", "clip_text", "aligned_expression", "contrasting_expression")),
        Stage("client_image", "actors.identity_t2i:IdentityText2Image",
              defaults={"output_dir": images, "face_column": "source_image", "output_name_column": "image_name"}),
        Stage("face_check", "actors.faces:FaceAnalyzer"),
        Stage("clip_score", "actors.clip:CLIPScorer", defaults={"text_column": "clip_text"}),
        Stage("nsfw", "actors.nsfw:NSFWClassifier"),
        Stage("image_check", MI.image_filters,
              ("face_count", "gender", "age", "identity_embedding", "face_backend", "clip_scores", "nsfw"),
              ("identity_similarity", "clip_score", "image_failures"), filter=True,
              evidence=("client_image", "face_check", "clip_score", "nsfw"), params_model=MI.ImageFilterParams),
    ]


PHASES = [
    Phase("faces", ("image", "img_path", "identity", "celeb_male", "celeb_young"), face_stages, ingest_faces),
    Phase("clients", ("row_index",) + CLIENT_FIELDS[1:], client_stages, ingest_clients),
    Phase("dialogues", ("resistance", "resistance_slug", "personality", "client_id", *CLIENT_FIELDS,
                        *SOURCE_COLUMNS), dialogue_stages, ingest_dialogues),
    Phase("turns", ("dialogue_id", "turn", "stage_direction", "statement", "history", "image_name",
                    *SOURCE_COLUMNS), turn_stages, ingest_turns),
]


# ------------------------------------------------------------------ export

def _faces_table(faces: pa.Table) -> pa.Table:
    """proc_celeba columns (SPEC A1) for every pool image that passed, from the face pass."""
    out = []
    for f in _ok(faces):
        x1, y1, x2, y2 = f["face_box"]
        out.append({"img_path": f["img_path"], "identity": f["identity"], "celeb_male": f["celeb_male"],
                    "celeb_young": f["celeb_young"], "age": f["age"],
                    "region": json.dumps({"x": round(x1), "y": round(y1), "w": round(x2 - x1), "h": round(y2 - y1)}),
                    "face_confidence": f["face_confidence"], "gender": f["gender_scores"],
                    "dominant_gender": f["gender"], "emotion": f["emotion_scores"],
                    "dominant_emotion": f["emotion"], "face_backend": f["face_backend"]})
    return pa.Table.from_pylist(out) if out else pa.table({"img_path": pa.array([], pa.string())})


def _reason(t: dict) -> str:
    """A turn's rejection reason, or its error as ``Type: message`` (shown only: verdicts are
    read from ``_status``)."""
    if t[R.STATUS] != R.ERROR:
        return str(t[R.REASON] or "")
    try:
        rec = json.loads(t[R.REASON])
    except (TypeError, ValueError):
        return str(t[R.REASON] or "")
    if not isinstance(rec, dict):
        return str(rec)
    message, kind = str(rec.get("message") or "").strip(), str(rec.get("type") or "")
    if not message:
        return f"{kind or 'error'} (no message)"
    return f"{kind}: {message}" if kind and not message.startswith(kind) else message


def dialogue_verdicts(dialogues: list[dict], turns: list[dict]) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Split the dialogues that passed phase 3 into kept and dropped: a dialogue is dropped
    whole when any of its client turns was rejected or failed (SPEC A8), decided from the
    turns' ``_status`` (an error with an empty message drops its dialogue too); the reason
    names every failing stage and turn (``udfs.mirror_dialogue.group_dialogue_verdicts``).
    Returns (kept dialogues, reject records, dialogues dropped per stage)."""
    by_dialogue: dict[str, list[dict]] = {}
    for t in turns:
        by_dialogue.setdefault(t["dialogue_id"], []).append(t)
    kept, dropped, per_stage = [], [], {}
    for d in dialogues:
        ts = by_dialogue.get(d["id"], [])
        if not ts:
            dropped.append({"id": d["id"], "stage": "dialogue", "reason": "no client turn"})
            per_stage["no_client_turn"] = per_stage.get("no_client_turn", 0) + 1
            continue
        stage = [(t[R.STAGE] or "unknown_stage") if t[R.STATUS] != R.OK else None for t in ts]
        names = list(dict.fromkeys(s for s in stage if s))
        failed = {n: [s == n for s in stage] for n in names}
        reasons = {n: [_reason(t) if s == n else None for t, s in zip(ts, stage)] for n in names}
        g = MD.group_dialogue_verdicts([d["id"]] * len(ts), [t["turn"] for t in ts], failed, reasons)[d["id"]]
        if not g["dropped"]:
            kept.append(d)
            continue
        for n in g["failures"]:
            per_stage[n] = per_stage.get(n, 0) + 1
        dropped.append({"id": d["id"], "stage": "dialogue", "reason": f"client turns failed: {g['reason']}",
                        "failures": g["failures"]})
    return kept, dropped, per_stage


def _stage_params(recipe: MirrorRecipe, stage: str, model: type[BaseModel]) -> BaseModel:
    cfg = recipe.stages.get(stage)
    return model.model_validate(cfg.params if cfg is not None else {})


def failures_by_filter(dialogues: pa.Table, turns: pa.Table, recipe: MirrorRecipe) -> dict[str, dict[str, dict]]:
    """Every dialogue filter (the six of ``udfs.mirror_dialogue.FILTERS`` and ``safety``) and
    every image filter (``udfs.mirror_images.IMAGE_FILTERS``) with ``{"stage", "count", "ran",
    "audit"}``: how many dialogues / images it failed (0 included; counted from the filters'
    structured failure columns, so verdicts recorded in audit mode count too), whether it ran
    (its stage enabled and the filter switched on in the stage's params) and whether its stage
    ran in audit mode (verdicts recorded, not applied; ``driver.plan``)."""
    p = plan(sys.modules[__name__], recipe)
    enabled, audit = {sp.stage.name for sp in p.stages}, set(p.audit_stages())

    def count(table: pa.Table, column: str, key) -> dict[str, int]:
        out: dict[str, int] = {}
        if column in table.column_names:
            for cell in table.column(column).to_pylist():
                cell = json.loads(cell) if isinstance(cell, str) and cell else cell or []
                for name in dict.fromkeys(key(f) for f in cell):
                    out[name] = out.get(name, 0) + 1
        return out

    def entry(stage: str, n: int, on: bool) -> dict:
        return {"stage": stage, "count": n, "ran": bool(on and stage in enabled), "audit": stage in audit}

    dparams = _stage_params(recipe, "dialogue_filters", MD.DialogueFilterParams)
    dcounts = count(dialogues, "dialogue_filter_failures", lambda f: f["filter"])
    out = {name: entry("dialogue_filters", dcounts.get(name, 0), name in dparams.filters) for name in MD.FILTERS}
    flagged = dialogues.column("safety_flagged").to_pylist() if "safety_flagged" in dialogues.column_names else []
    out["safety"] = entry("safety_check", sum(1 for f in flagged if f), "dialogue_safety" in enabled)
    iparams = _stage_params(recipe, "image_check", MI.ImageFilterParams)
    icounts = count(turns, "image_failures", lambda f: f["filter"] if isinstance(f, dict) else "unstructured")
    on = MI.enabled_image_filters(iparams)
    images = {name: entry("image_check", icounts.pop(name, 0), name in on) for name in MI.IMAGE_FILTERS}
    images.update({name: entry("image_check", n, True) for name, n in icounts.items()})  # old runs' rows
    return {"dialogues": out, "images": images}


def _model_name(recipe: MirrorRecipe, stage: str) -> str | None:
    cfg = recipe.stages.get(stage)
    return cfg.model.model if cfg is not None and cfg.model is not None else None


def export(by_phase: dict[str, pa.Table], recipe: MirrorRecipe, out: str) -> dict:
    """Write faces.parquet, mirror_data.csv/.parquet, expressions.parquet and the dialogue-level
    rejects ``rejects/dialogues.jsonl``; returns counts and the dialogue funnel row."""
    faces = _faces_table(by_phase["faces"])
    write_table(faces, io.join(out, "faces.parquet"))
    turns = by_phase["turns"].to_pylist() if by_phase["turns"].num_rows else []
    dialogues = _ok(by_phase["dialogues"])
    kept, dropped, per_stage = dialogue_verdicts(dialogues, turns)
    io.write_text(io.join(out, "rejects", "dialogues.jsonl"),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dropped))
    images: dict[str, dict[str, str | None]] = {}  # dialogue -> {turn index: image}, never by position
    for t in turns:
        images.setdefault(t["dialogue_id"], {})[str(t["turn"])] = t.get("image")
    model = _model_name(recipe, "screenplay")
    data = [{"idx": d["id"], "model": model, "personal_info": d["personal_info"], "personality": d["personality"],
             "distorted_thought": d["thought"], "thinking_trap": ", ".join(d["patterns"] or []),
             "reason_for_seeking_counseling": d["reason_counseling"], "cbt_plan": d["cbt_plan"],
             "cbt_technique": (d["cbt_techniques"] or [None])[0],
             "dialogue": d["dialogue"], "proc_dialogue": json.dumps(d["proc_dialogue"], ensure_ascii=False),
             "turn": d["turn"], "resistance": d["resistance"], "identity": d["identity"],
             "img_path": d["img_path"], "age": d["source_age"], "dominant_gender": d["source_gender"],
             "identity_mismatch": d["identity_mismatch"], "derived_fields": ", ".join(d["derived_fields"] or []),
             "images": json.dumps(images.get(d["id"], {}))} for d in kept]
    table = pa.Table.from_pylist(data) if data else pa.table({"idx": pa.array([], pa.string())})
    write_table(table, io.join(out, "mirror_data.parquet"))
    buf = _io.BytesIO()
    pacsv.write_csv(table, buf)
    io.write_bytes(io.join(out, "mirror_data.csv"), buf.getvalue())
    tt = by_phase["turns"]
    write_table(tt.select([c for c in EXPRESSION_COLUMNS if c in tt.column_names]),
                io.join(out, "expressions.parquet"))
    funnel = [{"stage": "dialogue_complete", "unit": "dialogues", "in": len(dialogues), "out": len(kept),
               "rejected": len(dropped), "errored": 0, "dropped_by_stage": per_stage,
               "failures_by_filter": failures_by_filter(by_phase["dialogues"], tt, recipe)}]
    return {"faces": faces.num_rows, "dialogues_kept": len(kept), "dialogues_dropped": len(dropped),
            "client_turns": len(turns), "funnel": funnel}


#: columns of OUT/expressions.parquet (one row per client turn)
EXPRESSION_COLUMNS = ["id", "dialogue_id", "turn", "stage_direction", "statement", "identity", "img_path",
                      "aligned_expression", "contrasting_expression", "prompt", "negative_prompt", "seed", "image",
                      "identity_method", "face_count", "age", "gender", "emotion", "identity_similarity",
                      "clip_score", "nsfw_score", "nsfw", "image_failures", R.STATUS, R.STAGE, R.REASON,
                      R.PLACEHOLDER, R.AUDIT]


# ------------------------------------------------------------------ command line

def add_arguments(ap) -> None:
    """MIRROR's own options (``python -m jobs mirror --help``)."""
    ap.add_argument("--faces", help="face pool: folder with labels.csv (file,identity) or a CelebA CSV")
    ap.add_argument("--face-images", help="image folder of a CelebA CSV")
    ap.add_argument("--drop-duplicated", action="store_true", default=None,
                    help="keep one pool image per identity (first by file name)")


def recipe_fields(args) -> dict:
    """Recipe fields from the command line (None = keep the recipe's)."""
    return {"faces": args.faces, "face_images": args.face_images, "drop_duplicated": args.drop_duplicated}
