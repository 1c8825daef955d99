"""MIRROR face identities (SPEC A3, A10): reading the face pool (``labels.csv`` or CelebA's CSV)
and assigning a pool identity to each dialogue by gender and nearest age group (pure functions;
no Ray, no model).

Sources: see ``udfs.mirror_intake`` (MIRROR, MIRROR-LLaVA, CBT-Bench, Cactus). Every prompt is
written in our own words from SPEC's descriptions; nothing is copied from the reference repository.
"""
from __future__ import annotations

import heapq
import io as _io
from typing import Any

import pyarrow.csv as pacsv

from udfs import io
from udfs import rows as R
from udfs.mirror_intake import age_group, normalize_gender, parse_age


def pool_image_folder(faces: str, face_images: str | None = None) -> str:
    """Folder the face pool's ``img_path`` names are relative to (recipe ``faces`` and
    ``face_images``): ``face_images`` when given; for a CelebA CSV its folder (or the
    ``img_align_celeba`` folder inside it when present); for a labels folder the folder itself."""
    if face_images:
        return face_images
    if faces.lower().endswith(".csv"):
        folder = faces.rsplit("/", 1)[0]
        return io.join(folder, "img_align_celeba") if io.exists(io.join(folder, "img_align_celeba")) else folder
    return faces


def read_face_pool(faces: str | None, face_images: str | None = None,
                   drop_duplicated: bool = False) -> tuple[list[dict], list[dict], int]:
    """Face-pool rows ``{id, image, img_path, identity, celeb_male, celeb_young}`` sorted by
    ``img_path``, rejects (lines with an empty file or identity) and the count
    ``drop_duplicated`` left out (it keeps the first image per identity in ``img_path`` order).

    ``faces``: a folder with ``labels.csv`` (``file, identity``) or CelebA's CSV (``image,
    identity[, Male, Young]``); ``face_images``: the image folder (``pool_image_folder``).
    Raises ``ValueError`` when ``faces`` is missing, has no CSV, or the CSV lacks the columns."""
    src = faces
    if not src:
        raise ValueError("--faces is required (a folder with labels.csv, or a CelebA CSV)")
    csv_uri = src if src.lower().endswith(".csv") else io.join(src, "labels.csv")
    folder = pool_image_folder(src, face_images)
    if not io.exists(csv_uri):
        raise ValueError(f"face pool {src}: no {csv_uri} (expected file,identity or image,identity[,Male,Young])")
    table = pacsv.read_csv(_io.BytesIO(io.read_bytes(csv_uri)),
                           convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    cols = set(table.column_names)
    name_col = "file" if "file" in cols else "image" if "image" in cols else None
    if name_col is None or "identity" not in cols:
        raise ValueError(f"{csv_uri}: needs columns file (or image) and identity; has {sorted(cols)}")
    recs, rejects = [], []
    for n, r in enumerate(table.to_pylist(), 2):
        name, ident = str(r.get(name_col) or "").strip(), str(r.get("identity") or "").strip()
        if not name or not ident:
            rejects.append({"id": f"{csv_uri}:{n}", "stage": "faces:ingest",
                            "reason": f"{csv_uri} line {n}: empty {name_col if not name else 'identity'}"})
            continue
        recs.append({"id": R.content_id(name), "image": io.join(folder, name), "img_path": name,
                     "identity": ident, "celeb_male": r.get("Male"), "celeb_young": r.get("Young")})
    recs.sort(key=lambda r: r["img_path"])
    if not drop_duplicated:
        return recs, rejects, 0
    seen: set[str] = set()
    kept = [r for r in recs if not (r["identity"] in seen or seen.add(r["identity"]))]
    return kept, rejects, len(recs) - len(kept)


def _norm_identity(entry: dict[str, Any]) -> tuple[str, str | None, float | None]:
    return str(entry.get("identity")), normalize_gender(entry.get("gender")), parse_age(entry.get("age"))


def assign_identities(dialogues: list[dict[str, Any]], identities: list[dict[str, Any]],
                      salt: str = "identity") -> list[dict[str, Any]]:
    """Give every dialogue a face identity of the client's gender and nearest age group.

    MIRROR never released this step (SPEC A3); the rule is ours:

    1. Client side (``dialogues``: dicts with ``id``, ``gender`` (intake-form ``female``/
       ``male`` or ``Woman``/``Man``) and ``age``): target = (gender, ``age_group(age)``).
    2. Candidates: the pool identities of that gender (all genders when the pool has none of
       it or the client's gender is unknown); among them those whose age group is nearest to
       the target (ties between an older and a younger group take both; all groups when the
       client's age is unknown).
    3. Dialogues are processed in the order of ``rows.seed_from_id(id, salt)`` (ties by id);
       each takes the least-used candidate so far, ties broken by ``seed_from_id(identity,
       salt)``. So dialogues spread evenly (use counts within one candidate set differ by at
       most 1), the choice looks random (dialogue order is a hash of the id), and the result
       depends only on the dialogue ids and the pool, never on input order. O(D log C).

    ``identities``: dicts with ``identity``, ``gender`` (``Man``|``Woman``; DeepFace spelling,
    ``actors/faces.py``) and ``age`` (years), plus any other fields (``img_path`` …). The first
    entry of an identity wins; entries with unknown gender or age are not used.

    Returns, per dialogue in input order: ``{"identity", "identity_gender", "identity_age",
    "identity_age_group", "client_gender", "client_age_group", "identity_mismatch" (None or
    e.g. "no Woman identity in the pool; no identity in age group 70 (nearest 40)"),
    "identity_record" (the chosen pool dict)}``. Raises ``ValueError`` when the pool has no
    usable identity (empty, or none with a known gender and age).
    """
    pool: dict[str, dict[str, Any]] = {}
    for e in identities:
        ident, g, a = _norm_identity(e)
        if ident not in pool and g is not None and a is not None and e.get("identity") is not None:
            pool[ident] = {"gender": g, "age": a, "group": age_group(a), "record": e}
    if not pool:
        raise ValueError(f"face pool has no usable identity ({len(identities)} entries; each needs "
                         "'identity', 'gender' Man|Woman and a numeric 'age')")
    by_gender: dict[str, dict[int, list[str]]] = {}
    for ident, p in pool.items():
        by_gender.setdefault(p["gender"], {}).setdefault(p["group"], []).append(ident)

    def candidates(g: str | None, grp: int | None) -> tuple[tuple[str, ...], list[str]]:
        notes = []
        if g in by_gender:
            groups = dict(by_gender[g])
        else:
            notes.append("client gender unknown" if g is None else f"no {g} identity in the pool")
            groups = {}
            for gg in by_gender.values():
                for k, v in gg.items():
                    groups.setdefault(k, []).extend(v)
        if grp is None:
            notes.append("client age unknown")
            chosen = sorted(groups)
        else:
            best = min(abs(k - grp) for k in groups)
            chosen = sorted(k for k in groups if abs(k - grp) == best)
            if best:
                notes.append(f"no identity in age group {grp} (nearest {', '.join(map(str, chosen))})")
        return tuple(sorted(i for k in chosen for i in groups[k])), notes

    prepared = []
    for pos, d in enumerate(dialogues):
        did = str(d.get(R.ID, d.get("id")))
        g, grp = normalize_gender(d.get("gender")), age_group(d.get("age"))
        cands, notes = candidates(g, grp)
        prepared.append((R.seed_from_id(did, salt), did, pos, g, grp, cands, notes))

    load = {i: 0 for i in pool}
    rank = {i: R.seed_from_id(i, salt) for i in pool}
    heaps: dict[tuple[str, ...], list[tuple[int, int, str]]] = {}
    out: list[dict[str, Any] | None] = [None] * len(dialogues)
    for _, did, pos, g, grp, cands, notes in sorted(prepared, key=lambda t: (t[0], t[1], t[2])):
        heap = heaps.get(cands)
        if heap is None:
            heap = heaps[cands] = [(load[i], rank[i], i) for i in cands]
            heapq.heapify(heap)
        # least-used candidate; a lazy heap: an entry whose identity was used through another
        # candidate set is stale (its load only grows) and is pushed back with the current load
        while heap[0][0] != load[heap[0][2]]:
            _, r, i = heapq.heappop(heap)
            heapq.heappush(heap, (load[i], r, i))
        _, r, pick = heapq.heappop(heap)
        load[pick] += 1
        heapq.heappush(heap, (load[pick], r, pick))
        p = pool[pick]
        out[pos] = {"identity": p["record"].get("identity"), "identity_gender": p["gender"],
                    "identity_age": p["age"], "identity_age_group": p["group"], "client_gender": g,
                    "client_age_group": grp, "identity_mismatch": "; ".join(notes) or None,
                    "identity_record": p["record"]}
    return out  # type: ignore[return-value]
