"""MIRROR-LLaVA counselling sessions: a simulated client and the counselor VLM over the Serve app (issue 10 part 4).

::

    python -m jobs mirror-llava-infer --input TEST_CLIENTS --model CKPT --cot base|planning|ec_planning \\
        --output OUT [--limit N] [--max-turns 20] [--profile offline|paper] [--temperature T]
        [--faces DIR] [--face-pool MIRROR_OUT]

What the original did (SPEC B3/B4, ``llava/chat/therapy.py``, ``client.py``, ``image_gen.py``,
``vlm.py``) and what is kept or fixed here:

- One session per client, up to ``--max-turns`` client turns (20), the last 16 messages as
  context (``udfs.mirror_llava.CONTEXT_MESSAGES``). Client turn 0 is non-verbal only (a
  bracketed stage direction). A session ends when the client's line carries ``[/END]`` (or a
  bare ``END``) after at least 2 exchanges: that client turn (with its image) is the last.
- Each client turn: the Serve app's ``describe`` (last 16 messages + the client line + the
  source face's gender) gives the image prompt and negative prompt; ``generate`` draws the
  client from the source face; ``verify`` checks NSFW, CLIP >= 0.2 and identity. Up to 10
  attempts, a new seed each time (19 first, then seeds derived from session and turn:
  ``udfs.mirror_llava.attempt_seeds``), every attempt's seed and verification report recorded;
  the last image is kept when none passed. The original's loop never retried (B6.1-2).
  ``accepted`` (audit-mode aware) is what the loop reads.
- The counselor variant is the explicit ``--cot`` (the original routed by substring of the
  model path and sent every ``./checkpoints/...`` path to the EC variants, B6.3): ``base``
  answers from the response prompt; ``planning`` first asks for a technique and plan once per
  session (cached); ``ec_planning`` asks every turn for the client's emotional state from the
  image, then plans again, then answers. Prompts are the training prompts
  (``udfs.mirror_llava.response_prompt``, ``emotion_prompt``) so inference matches training.
- The counselor samples as the Serve recipe says (``counselor.params``: temperature 0.7, top_p
  0.9, what the original effectively ran: its scripts passed ``--temperature 0`` but
  ``respond()`` never forwarded it, B6.5). ``--temperature`` overrides the temperature of
  every counselor request when given (0: greedy, what the scripts asked for).
- The counselor model is ``--model``: a ``mirror-llava-train`` output folder or one of its
  checkpoint folders (loaded as base + merged LoRA by ``actors.llm_hf``), a hub id / folder of a plain VLM (the LLaVA
  baseline) or ``placeholder:tiny-llava``; everything else comes from the Serve recipe
  (``jobs/recipes/mirror_llava_serve.<profile>.yaml``, ``--set`` overrides).

TEST_CLIENTS: a CSV, JSONL or Parquet of client records with ``img_path`` and
``dominant_gender`` (the original's ``test.csv``: ``idx, personal_info, personality,
distorted_thought, reason_for_seeking_counseling, img_path, dominant_gender``; or a MIRROR run's
``mirror_data.csv``/``.parquet``). ``idx`` is the session id (row number when missing).
``img_path`` rule: absolute paths and URIs are used as they are; a relative path is looked up
(1) in ``--faces DIR`` when given, (2) in the face pool of the MIRROR run whose ``manifest.json``
is next to the input (its recipe's ``faces``/``face_images``, the folder ``jobs.mirror``
read the pool from; a relative one is taken from the current folder, as that job did), (3)
relative to the input's folder.
``dominant_gender``: ``Man``/``Woman`` (DeepFace spelling; ``male``/``female`` accepted).
The published test set (HF ``multimodal-reframing/mirror`` ``mirror_test.csv``) holds client
profiles only, without ``img_path`` and ``dominant_gender``: with ``--face-pool`` (a MIRROR
run's output folder or its ``faces.parquet``; the original's ``proc_celeba.csv`` columns also
work) each such client gets a face by the rule the dataset assigns identities with
(``udfs.mirror_identity.assign_identities``: the gender and nearest age group of
``personal_info``, evenly spread, decided by ``idx``; an identity's face is its first image by
``img_path``). The choice is recorded per session (``face_assignment``: identity, image,
gender, any mismatch) and counted in the manifest (``faces_assigned``).

Output (OUT): ``sessions.jsonl``, one line per finished session in the original's shape
``{"idx", "history": [{"role": "Client", "content", "image_path", "prompt", "negative_prompt",
...}, {"role": "Counselor", "content", ...}], "total_tokens": {"prompt_tokens",
"completion_tokens"}}`` (every LLM call of the session: client, describe and counselor, with
``by_role``; the original counted its OpenAI client calls) plus our fields (``cot``,
``end_reason``, per client turn ``seed``, ``accepted``, ``attempts`` with every score; per
counselor turn ``planning``/``emotion`` and ``raw``, the reply before clean-up);
images under ``OUT/images/<idx>/<turn>_<source stem>.png`` (the original's naming); failed
sessions in ``errors/sessions.jsonl`` (``idx``, ``turn`` = index in ``history`` of the turn
being built, None for the source image, ``step``, ``error``); ``manifest.json``.
Resumable: a session whose ``idx`` is already in ``sessions.jsonl`` is not run again; errored
sessions are retried by the next run.

Sessions run as a Ray Data pipeline over session rows (``map`` with ``--concurrency`` actors,
each calling the app's handles); finished sessions are appended to ``sessions.jsonl`` as they
arrive, so an interrupted job loses at most the sessions in flight.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

from jobs.core import report
from jobs.core.report import Gallery
from udfs import io
from udfs import mirror_llava as ML

__all__ = ["ClientsError", "read_face_pool", "assign_faces", "read_clients", "SessionConfig", "SessionError",
           "run_session", "SessionWorker", "load_finished", "infer", "counselor_model", "parser", "main"]

SESSIONS_FILE = "sessions.jsonl"
ERRORS_FILE = "errors/sessions.jsonl"
#: describe / client calls per turn before the session fails (each retry with another seed)
LLM_TRIES = 3


#: seconds a session waits for one call of the Serve app (the app's own backend timeout is shorter)
DEFAULT_REQUEST_TIMEOUT_S = 900.0


class ClientsError(ValueError):
    """A TEST_CLIENTS row cannot be used; the message names the row and the field."""


class SessionError(RuntimeError):
    """A session step failed; ``turn`` and ``step`` say where."""

    def __init__(self, turn: int | None, step: str, message: str):
        super().__init__(f"{'session' if turn is None else f'turn {turn}'} step {step}: {message}")
        self.turn, self.step, self.message = turn, step, message


# ====================================================================== input

def _face_pool(folder: str) -> str | None:
    """The face-pool image folder of the MIRROR run whose ``manifest.json`` is in ``folder``
    (its recipe's ``faces``/``face_images``, ``udfs.mirror_identity.pool_image_folder``), or None."""
    path = io.join(folder, "manifest.json")
    if not io.exists(path):
        return None
    try:
        recipe = json.loads(io.read_text(path)).get("recipe") or {}
    except json.JSONDecodeError:
        return None
    if recipe.get("pipeline") != "mirror" or not recipe.get("faces"):
        return None
    from udfs.mirror_identity import pool_image_folder

    return pool_image_folder(str(recipe["faces"]), recipe.get("face_images"))


def read_face_pool(uri: str, faces: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """``(pool entries, image folder)`` of ``--face-pool``: a MIRROR run's folder (its
    ``faces.parquet``, the proc_celeba columns; images in that run's face pool) or a
    ``.parquet``/``.csv``/``.jsonl`` with ``img_path``, ``identity``, ``age`` and
    ``dominant_gender`` (the original's ``proc_celeba.csv``; images beside it). ``faces``
    overrides the image folder. Entries (``identity``, ``gender``, ``age``, ``img_path``) come
    sorted by ``img_path``, so an identity's face is its first image, as in ``jobs.mirror``.
    Raises ``ClientsError`` naming the file, row and field that is missing."""
    from udfs.mirror_intake import normalize_gender, parse_age

    table = uri if uri.lower().endswith((".parquet", ".csv", ".jsonl")) else io.join(uri, "faces.parquet")
    if not io.exists(table):
        raise ClientsError(f"--face-pool {uri}: no {table} (give a MIRROR run's output folder or its faces.parquet)")
    records, bad = io.read_records(table)
    if bad:
        raise ClientsError(bad[0]["reason"])
    pool = []
    for i, row in records:
        entry = {"identity": ML._text(row.get("identity")), "gender": normalize_gender(row.get("dominant_gender")),
                 "age": parse_age(row.get("age")), "img_path": ML._text(row.get("img_path"))}
        for field_, key in (("img_path", "img_path"), ("identity", "identity"), ("dominant_gender", "gender"),
                            ("age", "age")):
            if entry[key] in (None, ""):
                raise ClientsError(f"{table} row {i} field {field_!r}: missing or unreadable ({row.get(field_)!r})")
        pool.append(entry)
    if not pool:
        raise ClientsError(f"{table}: the face pool is empty")
    folder = faces or (_face_pool(uri) if table != uri else None) or os.path.dirname(table) or "."
    return sorted(pool, key=lambda e: (e["img_path"], e["identity"])), folder


def assign_faces(clients: list[dict[str, Any]], pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A face of ``pool`` (``read_face_pool``) for each client row without one, by the rule
    ``jobs.mirror`` assigns dataset identities with (``udfs.mirror_identity.assign_identities``:
    the client's gender and nearest age group from ``personal_info``, falling back to
    ``dominant_gender``; spread evenly, decided by the session id). Returns per client the
    record ``{identity, img_path, dominant_gender, identity_age, client_gender, client_age_group,
    identity_mismatch, rule}``."""
    from udfs.mirror_identity import assign_identities

    want = []
    for c in clients:
        gender, age = ML.client_gender_age(c["personal_info_raw"])
        want.append({"id": c["idx"], "gender": gender or c.get("dominant_gender"), "age": age})
    out = []
    for a in assign_identities(want, pool):
        face = a["identity_record"]
        out.append({"identity": a["identity"], "img_path": face["img_path"], "dominant_gender": face["gender"],
                    "identity_age": a["identity_age"], "client_gender": a["client_gender"],
                    "client_age_group": a["client_age_group"], "identity_mismatch": a["identity_mismatch"],
                    "rule": "udfs.mirror_identity.assign_identities"})
    return out


def read_clients(uri: str, faces: str | None = None, limit: int | None = None,
                 face_pool: str | None = None) -> list[dict[str, Any]]:
    """Session rows of TEST_CLIENTS (module docstring: columns and the ``img_path`` rule).

    Returns dicts with ``idx`` (str), ``personal_info``, ``personality``, ``distorted_thought``,
    ``reason_for_seeking_counseling``, ``img_path`` (resolved), ``source_stem``,
    ``dominant_gender`` (``Man``/``Woman``) and ``face_assignment`` (None for a given face,
    else the JSON of ``assign_faces``' record). A row without ``img_path`` (the published
    ``mirror_test.csv`` has client profiles only) gets a face from ``face_pool``
    (``read_face_pool``). Raises ``ClientsError`` naming the row and field for a missing image
    path without a face pool, an unknown gender or a duplicate ``idx``."""
    from udfs.mirror_intake import normalize_gender

    if not io.exists(uri):
        raise ClientsError(f"{uri}: input not found")
    if not uri.lower().endswith((".csv", ".jsonl", ".parquet")):
        raise ClientsError(f"{uri}: unsupported input (need .csv, .jsonl or .parquet)")
    records, bad = io.read_records(uri)
    if bad:
        raise ClientsError(bad[0]["reason"])
    rows = [r for _, r in records]
    folder = os.path.dirname(uri) or "."
    pool = _face_pool(folder)
    out, seen, unassigned = [], set(), []
    for i, row in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        idx = ML._text(row.get("idx"))
        idx = idx[:-2] if idx.endswith(".0") and idx[:-2].isdigit() else idx  # CSV ints read as floats
        idx = idx or str(i)
        where = f"row {i} (idx {idx!r})"
        if idx in seen:
            raise ClientsError(f"{where} field 'idx': duplicate session id")
        seen.add(idx)
        client = {"idx": idx, "personal_info": ML.personal_information(row.get("personal_info")),
                  "personality": ML._text(row.get("personality")),
                  "distorted_thought": ML._text(row.get("distorted_thought")),
                  "reason_for_seeking_counseling": ML._text(row.get("reason_for_seeking_counseling")),
                  "img_path": "", "source_stem": "", "dominant_gender": None, "face_assignment": None}
        raw = ML._text(row.get("img_path"))
        if not raw:
            if not face_pool:
                raise ClientsError(f"{where} field 'img_path': missing (the published mirror_test.csv has client "
                                   "profiles only: give --face-pool, a MIRROR run or its faces.parquet, to assign "
                                   "faces by the dataset's rule)")
            unassigned.append((client, row))
            out.append(client)
            continue
        if "://" in raw or os.path.isabs(raw):
            path = raw
        elif faces or pool:
            path = ML.resolve_image(raw, faces or pool)
        else:
            path = ML.resolve_image(raw, folder or ".")
        gender = normalize_gender(row.get("dominant_gender"))
        if gender is None:
            raise ClientsError(f"{where} field 'dominant_gender': {row.get('dominant_gender')!r} is not Man/Woman")
        client.update(img_path=path, source_stem=os.path.splitext(os.path.basename(raw))[0], dominant_gender=gender)
        out.append(client)
    if unassigned:
        entries, images = read_face_pool(face_pool, faces)
        todo = [{**c, "personal_info_raw": row.get("personal_info"),
                 "dominant_gender": normalize_gender(row.get("dominant_gender"))} for c, row in unassigned]
        for (client, _), rec in zip(unassigned, assign_faces(todo, entries)):
            client.update(img_path=ML.resolve_image(rec["img_path"], images), dominant_gender=rec["dominant_gender"],
                          source_stem=os.path.splitext(os.path.basename(rec["img_path"]))[0],
                          face_assignment=json.dumps(rec))
    return out


# ====================================================================== one session

class SessionConfig(dict):
    """Session settings (a plain dict so Ray ships it as is): ``cot``, ``max_turns``,
    ``context``, ``temperature`` (None: the recipe's counselor sampling), ``max_attempts``,
    ``output`` (OUT), ``counselor_max_tokens`` (None: the recipe's)."""


def _usage(total: dict[str, Any], resp: Any, role: str) -> None:
    """Add a response's token counts to the session total and to ``total["by_role"][role]``."""
    by_role = total.setdefault("by_role", {}).setdefault(role, {"prompt_tokens": 0, "completion_tokens": 0})
    for key in ("prompt_tokens", "completion_tokens"):
        n = int(getattr(resp, key, 0) or 0)
        total[key] += n
        by_role[key] += n


def _describe(exc: BaseException) -> str:
    """``Type: message`` of the root cause (a handle call wraps the replica's exception in a
    ``RayTaskError`` whose ``cause`` is the original; HTTPException carries ``detail``)."""
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    detail = getattr(exc, "detail", None)
    if detail is None and hasattr(exc, "errors") and callable(exc.errors):  # pydantic ValidationError
        try:
            e = exc.errors()[0]
            detail = f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
        except Exception:  # noqa: BLE001 - fall back to str()
            detail = None
    status = getattr(exc, "status_code", None)
    return (f"{type(exc).__name__}{f' {status}' if status else ''}: {detail if detail is not None else exc}")[:2000]


def _step(turn: int, step: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except SessionError:
        raise
    except Exception as exc:  # noqa: BLE001 - becomes the session's error record
        raise SessionError(turn, step, _describe(exc)) from exc


def _scores(report: Any) -> dict[str, Any]:
    """A VerifyResponse (or dict) -> the JSON kept per attempt: verdicts and every score."""
    r = report.model_dump() if hasattr(report, "model_dump") else dict(report)
    c = r.get("checks") or {}
    return {"passed": r.get("passed"), "accepted": r.get("accepted"), "audit": r.get("audit"),
            "audit_reason": r.get("audit_reason"), "failures": r.get("failures"),
            "nsfw": (c.get("nsfw") or {}).get("score"), "nsfw_scores": (c.get("nsfw") or {}).get("scores"),
            "clip": (c.get("clip") or {}).get("score"), "identity": (c.get("identity") or {}).get("similarity"),
            "face_count": (c.get("identity") or {}).get("face_count")}


def run_session(client: dict[str, Any], api: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one session; returns the session record (module docstring). ``api`` has callables
    ``describe``, ``generate``, ``verify``, ``client``, ``counselor`` taking the Serve app's
    request dicts and returning its response models (``SessionWorker`` binds them to the
    handles). Raises ``SessionError`` (turn, step) on the first failing step."""
    import base64

    from udfs.images import load_image

    cot, max_turns, ctx = cfg["cot"], int(cfg["max_turns"]), int(cfg["context"])
    source = _step(None, "source_image", lambda: io.read_bytes(client["img_path"]))
    _step(None, "source_image", lambda: load_image(source, client["idx"], "img_path"))  # fail before any call
    persona, reason = client["personal_info"], client["reason_for_seeking_counseling"]
    history: list[dict[str, Any]] = []
    total = {"prompt_tokens": 0, "completion_tokens": 0}
    planning: dict[str, str] | None = None
    counselor_sampling = {}  # the Serve recipe's sampling, unless --temperature was given
    if cfg.get("temperature") is not None:
        counselor_sampling["temperature"] = float(cfg["temperature"])
    if cfg.get("counselor_max_tokens"):
        counselor_sampling["max_tokens"] = int(cfg["counselor_max_tokens"])
    exchanges, end_reason = 0, "max_turns"
    for turn in range(max_turns):
        t = 2 * turn  # index of this client turn in history
        # 1. the simulated client's line (turn 0: non-verbal only)
        line = None
        for k in range(LLM_TRIES):
            resp = _step(t, "client", lambda: api.client({"messages": ML.client_messages(client, history, context=ctx),
                                                          "sampling": {"seed": 1000 * turn + k}}))
            _usage(total, resp, "client")
            line = ML.split_client_line(resp.reply, nonverbal_only=turn == 0)
            if line["content"]:
                break
        if not line or not line["content"]:
            raise SessionError(t, "client", f"empty client reply after {LLM_TRIES} tries")
        # 2. a verified image of the client for this turn
        direction = line["stage_direction"] or line["statement"][:200]
        desc_history = [{"speaker": "Client" if h["role"] == "Client" else "Therapist",
                         "stage_direction": (h.get("stage_direction") or None) and h["stage_direction"][:200],
                         "statement": (h.get("statement", "") if h["role"] == "Client" else h["content"])[:4000]}
                        for h in history[-ctx:]]
        desc = None
        for k in range(LLM_TRIES):
            try:
                desc = api.describe({"history": desc_history, "gender": client["dominant_gender"],
                                     "utterance": {"speaker": "Client", "stage_direction": direction[:200] or None,
                                                   "statement": line["statement"][:4000]},
                                     "sampling": {"seed": 1000 * turn + k}})
                break
            except Exception as exc:  # noqa: BLE001 - an LLM reply that failed its schema: try another seed
                if k == LLM_TRIES - 1:
                    raise SessionError(t, "describe", _describe(exc)) from exc
        _usage(total, desc, "describe")

        def generate(seed: int) -> dict[str, Any]:
            g = _step(t, "generate", lambda: api.generate({"source_image": source, "prompt": desc.prompt,
                                                           "negative_prompt": desc.negative_prompt or "",
                                                           "seed": seed}))
            return {"image": base64.b64decode(g.image_png_b64), "placeholder": g.placeholder, "seed": g.seed}

        def verify(image: bytes, gen: dict[str, Any]) -> dict[str, Any]:
            rep = _step(t, "verify", lambda: api.verify({"image": image, "source_image": source,
                                                         "stage_direction": (direction or "neutral")[:200],
                                                         "image_placeholder": gen["placeholder"]}))
            return _scores(rep)

        seeds = ML.attempt_seeds(f"{client['idx']}:{turn}", int(cfg["max_attempts"]))
        img = ML.verified_image(generate, verify, seeds)
        image_path = io.join(cfg["output"], "images", client["idx"], f"{turn}_{client['source_stem']}.png")
        io.write_bytes(image_path, img["image"])
        history.append({"role": "Client", "content": line["content"], "image_path": image_path,
                        "prompt": desc.prompt, "negative_prompt": desc.negative_prompt,
                        "stage_direction": line["stage_direction"], "statement": line["statement"],
                        "expression": {"aligned": desc.aligned, "contrasting": desc.contrasting},
                        "seed": img["seed"], "accepted": img["accepted"],
                        "attempts": [{"attempt": a["attempt"], "seed": a["seed"], **a["report"]}
                                     for a in img["attempts"]]})
        # 3. end condition (after the image, as the original)
        if line["end"] and exchanges >= 2:
            end_reason = "client_end"
            break
        # 4. the counselor's reply to the statement and the image
        hist_lines = ML.session_history_lines(history, ctx) if turn else []  # no history block on turn 0

        def counsel(prompt: str, step: str):
            resp = _step(t + 1, step, lambda: api.counselor({"messages": [{"role": "user", "content": prompt}],
                                                             "image": img["image"],
                                                             "sampling": counselor_sampling}))
            _usage(total, resp, "counselor")
            return resp.reply

        extra: dict[str, Any] = {}
        emotion = ""
        if cot == "ec_planning":
            raw = counsel(ML.emotion_prompt(), "emotion_recognition")
            emotion = " ".join(str(raw).split())
            extra["emotion"] = emotion
            if not emotion:
                emotion = "not recognised"
                extra["emotion_missing"] = True
        if cot in ("planning", "ec_planning") and (planning is None or cot == "ec_planning"):
            raw = counsel(ML.planning_prompt(persona, reason, hist_lines, emotion=emotion if cot == "ec_planning"
                                             else ""), "planning")
            planning = {**ML.parse_planning(raw, client.get("distorted_thought", "")), "raw": raw, "turn": t + 1}
        if planning is not None:
            extra["planning"] = planning
        prompt = ML.response_prompt(cot, persona or "(not given)", reason or "(not given)", hist_lines,
                                    emotion=emotion, technique=planning["technique"] if planning else "",
                                    plan=planning["plan"] if planning else "")
        raw = counsel(prompt, "response")
        reply = ML.clean_counselor_reply(raw)
        if reply != raw:
            extra["raw"] = raw  # what the model said before the original's post-processing
        history.append({"role": "Counselor", "content": reply, **extra})
        exchanges += 1
    assigned = client.get("face_assignment")
    return {"idx": client["idx"], "history": history, "total_tokens": total, "cot": cot,
            "end_reason": end_reason, "client_turns": sum(h["role"] == "Client" for h in history),
            "img_path": client["img_path"], "face_assignment": json.loads(assigned) if assigned else None}


class SessionWorker:
    """Ray Data callable class: one session per row through the Serve app's handles.

    Returns per row ``{idx, ok, record, error}`` (JSON strings: sessions have nested lists of
    varying shape). Errors become ``error`` (``{idx, turn, step, error}``), never exceptions."""

    def __init__(self, app_name: str, cfg: dict[str, Any]):
        from ray import serve

        h = serve.get_app_handle(app_name)
        self.cfg = dict(cfg)

        timeout_s = float(self.cfg.get("request_timeout_s") or DEFAULT_REQUEST_TIMEOUT_S)

        def call(name):  # a call that does not return in time ends the session with an error record
            return lambda req: getattr(h, name).remote(req).result(timeout_s=timeout_s)

        self.api = type("ServeAPI", (), {n: staticmethod(call(n))
                                         for n in ("describe", "generate", "verify", "client", "counselor")})

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        t0 = time.time()
        try:
            rec = run_session(row, self.api, self.cfg)
            rec["wall_s"] = round(time.time() - t0, 2)
            return {"idx": row["idx"], "ok": True, "record": json.dumps(rec, ensure_ascii=False), "error": ""}
        except Exception as exc:  # noqa: BLE001 - a failed session is an error record
            err = {"idx": row["idx"], "turn": getattr(exc, "turn", None), "step": getattr(exc, "step", None),
                   "error": str(exc) if isinstance(exc, SessionError) else _describe(exc),
                   "wall_s": round(time.time() - t0, 2)}
            return {"idx": row["idx"], "ok": False, "record": "", "error": json.dumps(err, ensure_ascii=False)}


# ====================================================================== the job

def load_finished(out: str) -> tuple[set[str], list[str]]:
    """``(finished session ids, their JSONL lines)`` of ``OUT/sessions.jsonl``; a torn last
    line (interrupted write) is dropped."""
    path = io.join(out, SESSIONS_FILE)
    if not io.exists(path):
        return set(), []
    ids, lines = set(), []
    for line in io.read_text(path).splitlines():
        try:
            ids.add(str(json.loads(line)["idx"]))
            lines.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids, lines


def report_rows(out: str, manifest: dict) -> tuple[Gallery, list[dict], list[dict]]:
    """The run report's galleries (``jobs.core.report``): one card per client turn of the finished
    sessions (generated image, stage direction and statement, the last attempt's verifier
    scores) and one per failed session with its step and error."""
    _, lines = load_finished(out)
    kept = []
    for line in lines:
        s = json.loads(line)
        for k, h in enumerate(s.get("history", [])):
            if h.get("role") == "Client":
                last = (h.get("attempts") or [{}])[-1]
                kept.append({"id": f"{s['idx']}:{k}", "image_path": h.get("image_path"),
                             "stage_direction": h.get("stage_direction"), "statement": h.get("statement"),
                             **{f"verify_{c}": last.get(c) for c in ("clip", "identity", "nsfw", "accepted")},
                             "attempts": len(h.get("attempts") or [])})
    errors = io.join(out, ERRORS_FILE)
    failed = [{"id": e["idx"], "_stage": e.get("step") or "", "_reason": e.get("error") or ""}
              for e in map(json.loads, io.read_text(errors).splitlines() if io.exists(errors) else [])]
    spec = Gallery(image="image_path", text=("stage_direction", "statement"),
                   scores=("verify_clip", "verify_identity", "verify_nsfw", "verify_accepted", "attempts"))
    return spec, kept, failed


def infer(clients: list[dict[str, Any]], out: str, app_name: str, cfg: dict[str, Any], *,
          concurrency: int = 1) -> dict[str, Any]:
    """Run the sessions of ``clients`` not yet in ``OUT/sessions.jsonl`` through the running
    Serve app ``app_name`` (Ray Data ``map`` with ``concurrency`` actors); append finished
    sessions as they arrive, write ``errors/sessions.jsonl``. Returns counts."""
    import ray

    done, lines = load_finished(out)
    todo = [c for c in clients if c["idx"] not in done]
    path = io.join(out, SESSIONS_FILE)
    io.write_text(path, "".join(line + "\n" for line in lines))  # drops a torn line
    errors, finished, walls = [], 0, []
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map(SessionWorker, fn_constructor_kwargs={"app_name": app_name, "cfg": {**cfg, "output": out}},
                    compute=ray.data.ActorPoolStrategy(size=max(1, min(concurrency, len(todo)))), num_cpus=0.05)
        local = not io.is_remote(path)
        for r in ds.iter_rows():
            if r["ok"]:
                finished += 1
                walls.append(json.loads(r["record"]).get("wall_s"))
                lines.append(r["record"])
                if local:  # append as sessions finish (resumable after a crash)
                    with open(io.filesystem(path)[1], "a", encoding="utf-8") as f:
                        f.write(r["record"] + "\n")
            else:
                errors.append(r["error"])
        if not local:
            io.write_text(path, "".join(line + "\n" for line in lines))
    io.write_text(io.join(out, ERRORS_FILE), "".join(e + "\n" for e in errors))
    return {"clients": len(clients), "skipped_finished": len(clients) - len(todo), "finished": finished,
            "errors": len(errors), "session_wall_s": walls}


def counselor_model(model: str) -> str:
    """``--model`` -> the counselor's model spec ``model``: an existing local path becomes
    absolute; the output folder of ``mirror-llava-train`` (its ``manifest.json`` names the
    final checkpoint, ``CKPT/train/checkpoint_*``) becomes that checkpoint folder; anything else
    (hub id, ``placeholder:``/``pkg:`` spec) is kept."""
    if ":" in model.split("/")[0] or not os.path.isdir(model):
        return model
    model = os.path.abspath(model)
    manifest = os.path.join(model, "manifest.json")
    if not os.path.isfile(os.path.join(model, "base.json")) and os.path.isfile(manifest):
        m = json.load(open(manifest))
        if m.get("command") == "mirror-llava-train" and m.get("checkpoint"):
            return str(m["checkpoint"])
    return model


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs mirror-llava-infer", description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, help="TEST_CLIENTS: .csv/.jsonl/.parquet with img_path, dominant_gender")
    ap.add_argument("--model", help="counselor: mirror-llava-train checkpoint, VLM id/folder or "
                    "placeholder:tiny-llava (required unless --app)")
    ap.add_argument("--app", help="use this already running Serve app (serve run ...) instead of starting one; "
                    "its counselor is the model")
    ap.add_argument("--cot", required=True, choices=ML.COT_TYPES, help="counselor variant (explicit; SPEC B6.3)")
    ap.add_argument("--output", required=True, help="output folder or s3:// URI")
    ap.add_argument("--limit", type=int, help="at most N clients")
    ap.add_argument("--max-turns", type=int, default=20, help="client turns per session (20)")
    ap.add_argument("--context", type=int, default=ML.CONTEXT_MESSAGES, help="messages of context (16)")
    ap.add_argument("--max-attempts", type=int, default=ML.MAX_IMAGE_ATTEMPTS, help="image attempts per turn (10)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="counselor temperature; default: the Serve recipe's sampling (0.7, top_p 0.9: what the "
                    "original effectively ran, SPEC B6.5); 0 = greedy, what its scripts asked for")
    ap.add_argument("--counselor-max-tokens", type=int, help="counselor max new tokens (default: the recipe's)")
    ap.add_argument("--faces", help="folder relative img_path values are resolved against")
    ap.add_argument("--face-pool", help="faces for clients without img_path (the published mirror_test.csv): a "
                    "MIRROR run's output folder or its faces.parquet; assigned by the dataset's identity rule")
    ap.add_argument("--concurrency", type=int, default=2, help="sessions in flight (Ray Data actors)")
    ap.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                    help=f"seconds to wait for one call of the Serve app; past it the session ends with an error "
                    f"record naming the turn and step ({DEFAULT_REQUEST_TIMEOUT_S:g})")
    ap.add_argument("--profile", choices=["offline", "paper"], default=None, help="Serve recipe profile (offline)")
    ap.add_argument("--recipe", help="Serve recipe YAML (default: the bundled one for the profile)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Serve recipe override")
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local cluster)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs mirror-llava-infer``: start the Serve app, run the sessions, write the
    manifest. Returns 0 (also when some sessions errored: see ``errors/``), 2 for bad
    arguments or input."""
    args = parser().parse_args(argv)
    for name in ("max_turns", "max_attempts", "concurrency"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1")
            return 2
    if args.context < 0 or not (args.temperature is None or 0 <= args.temperature <= 2):
        print("error: --context must be >= 0 and --temperature in 0..2")
        return 2
    if not args.model and not args.app:
        print("error: --model is required (or --app NAME of a running Serve app)")
        return 2
    from jobs.mirror_llava.serve import build_app, load_serve_recipe

    try:
        clients = read_clients(args.input, args.faces, args.limit, face_pool=args.face_pool)
        model = counselor_model(args.model) if args.model else None
        recipe = load_serve_recipe(args.profile or ("offline" if not args.recipe else None), args.recipe,
                                   args.set + ([f"counselor.model.model={json.dumps(model)}"] if model else []))
        app = None if args.app else build_app(recipe)
    except ValueError as exc:  # ClientsError, RecipeError, ModelResolutionError
        print(f"error: {exc}")
        return 2
    from ray import serve

    from jobs.core.driver import ray_init

    ray_init(args.address)
    t0 = time.time()
    app_name = args.app or recipe.app_name
    if app is not None:
        serve.start(http_options={"location": "NoServer"})  # handles only: no HTTP proxy, no port
        serve.run(app, name=app_name, route_prefix=None)
    counselor = serve.get_app_handle(app_name).health.remote().result(timeout_s=args.request_timeout).models["counselor"]
    ready_s = time.time() - t0
    base_json = os.path.join(str(counselor.get("model")), "base.json")
    if os.path.isfile(base_json):  # a mirror-llava-train checkpoint: record its base model's identity
        counselor = {**counselor, "lora_base": json.load(open(base_json)).get("resolved")}
    cfg = {"cot": args.cot, "max_turns": args.max_turns, "context": args.context, "temperature": args.temperature,
           "max_attempts": args.max_attempts, "counselor_max_tokens": args.counselor_max_tokens,
           "request_timeout_s": args.request_timeout}
    t1 = time.time()
    try:
        counts = infer(clients, args.output, app_name, cfg, concurrency=args.concurrency)
    finally:
        if app is not None:
            serve.delete(app_name)
    wall = time.time() - t1
    walls = [w for w in counts.pop("session_wall_s") if w is not None]
    sampling = {k: v for k, v in recipe.stages["counselor"].params.items() if k in ("temperature", "top_p")} \
        if not args.app else {}
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    manifest = {"command": "mirror-llava-infer", "argv": argv if argv is not None else [], "input": args.input,
                "model": model or counselor.get("model"), "cot": args.cot, "settings": cfg,
                "face_pool": args.face_pool, "faces_assigned": sum(1 for c in clients if c.get("face_assignment")),
                # what the counselor sampled with (the recipe's unless --temperature; --app: the running app's)
                "counselor_sampling": sampling or "the running app's recipe",
                "profile": None if args.app else recipe.profile,
                "serve": {"app_name": app_name, "started_here": app is not None, "ready_s": round(ready_s, 1),
                          "counselor": counselor},
                **counts, "wall_s": round(wall, 1),
                "sessions_per_hour": (round(3600 * counts["finished"] / wall, 1)
                                      if wall and counts["finished"] else None),
                "session_s_median": sorted(walls)[len(walls) // 2] if walls else None,
                "outputs": {"sessions": SESSIONS_FILE, "errors": ERRORS_FILE, "images": "images/"}}
    io.write_text(io.join(args.output, "manifest.json"), json.dumps(manifest, indent=2, default=str) + "\n")
    report.write_quietly(args.output)
    print(f"{counts['finished']} sessions finished, {counts['errors']} errors, {counts['skipped_finished']} "
          f"already done; {args.output}/{SESSIONS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
