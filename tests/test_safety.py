"""NSFW and dialogue-safety stages with their tiny placeholder models, and the filter rules.

The placeholders are built into a private cache and loaded through the model resolver and
the real ``from_pretrained``/``pipeline`` path. Dialogues are real counselling lines from
../shared/data/counseling (MIRROR-LLaVA samples, CBT-Bench situations); images are the COCO
photos in ../shared/data/captions. Random-weight models give arbitrary labels, so the tests
assert plumbing, batching and rules, never accuracy.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from actors import placeholders
from actors.models import ModelResolutionError, resolve
from jobs.core.runtime import Stage, StageRun, apply_stage
from tests.helpers import coco_images, numpy_batch, placeholder_models, run_ray, single
from udfs import rows
from udfs import safety as S

SHARED = Path(__file__).resolve().parents[2] / "shared"
COUNSELING = SHARED / "data" / "counseling"
NSFW = {"backend": "transformers", "model": "placeholder:tiny-nsfw-vit"}
T5 = {"backend": "seq2seq", "model": "placeholder:tiny-canary-t5"}
BERT = {"backend": "sequence-classification", "model": "placeholder:tiny-canary-distilbert"}


def mirror_dialogues() -> list[list[dict]]:
    """Four real dialogues as ``[{speaker, statement, t}]`` lists: the screenplay lines of the
    MIRROR-LLaVA sample (6 lines) and the openings of three Cactus intakes (counsellor
    greeting, client reply, client's reason for counselling; "Counselor" written "Therapist"
    as in MIRROR's screenplays)."""
    text = "\n".join(c["value"] for c in json.loads((COUNSELING / "mirror_llava_samples.jsonl").read_text()
                                                    .splitlines()[0])["conversations"])
    out = [[{"speaker": m.group(1), "statement": m.group(2), "t": k}
            for k, m in enumerate(re.finditer(r"^(Therapist|Client): (.+)$", text, re.M))]]
    for line in (COUNSELING / "cactus_eval_intake.jsonl").read_text().splitlines()[:6:2]:
        r = json.loads(line)
        out.append([{"speaker": "Therapist", "statement": r["init_history_counselor"], "t": 0},
                    {"speaker": "Client", "statement": r["init_history_client"], "t": 1},
                    {"speaker": "Client", "statement": r["reason_counseling"], "t": 2}])
    assert len(out[0]) == 6 and len(out) == 4
    return out


def real_texts(n: int) -> list[str]:
    texts = [u["statement"] for d in mirror_dialogues() for u in d]
    texts += [json.loads(line)["situation"] for line in (COUNSELING / "cbt_bench_distortions.jsonl").read_text()
              .splitlines()]
    assert len(texts) >= n
    return texts[:n]


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The three placeholders built once into a private cache (MMSYNTH_CACHE)."""
    yield from placeholder_models(tmp_path_factory, "mmsynth-cache-safety", {"nsfw": NSFW, "t5": T5, "bert": BERT})


@pytest.fixture(scope="module")
def nsfw(models):
    from actors.nsfw import NSFWClassifier

    return NSFWClassifier(models["nsfw"], {"batch_size": 4, "num_threads": 1})


@pytest.fixture(scope="module")
def canary_t5(models):
    from actors.safety import DialogueSafetyClassifier

    return DialogueSafetyClassifier(models["t5"], {"batch_size": 8, "num_threads": 1})


@pytest.fixture(scope="module")
def canary_bert(models):
    from actors.safety import DialogueSafetyClassifier

    return DialogueSafetyClassifier(models["bert"], {"batch_size": 8, "num_threads": 1})


# -- placeholders ------------------------------------------------------------------------

def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.parametrize("builder", ["build_tiny_nsfw_vit", "build_tiny_canary_t5", "build_tiny_canary_distilbert"])
def test_placeholder_builds_are_deterministic(builder, tmp_path):
    getattr(placeholders, builder)(tmp_path / "a")
    getattr(placeholders, builder)(tmp_path / "b")
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a and a == b


def test_placeholders_in_the_cache_and_t5_vocab_extension(models):
    nsfw_dir, t5_dir, bert_dir = (Path(models[k]["path"]) for k in ("nsfw", "t5", "bert"))
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in nsfw_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in t5_dir.iterdir()}
    assert json.loads((bert_dir / "config.json").read_text())["id2label"] == {
        str(i): label for i, label in enumerate(S.CANARY_LABELS)}
    # extending the T5 vocabulary keeps every default piece's id (tiny-sd3's tokenizer unchanged)
    base = placeholders.tiny_t5_tokenizer().get_vocab()
    ext = placeholders.tiny_t5_tokenizer(placeholders.CANARY_PIECES).get_vocab()
    assert base and all(ext[k] == v for k, v in base.items())
    assert len(ext) == len(base) + len(placeholders.CANARY_PIECES)


# -- NSFW --------------------------------------------------------------------------------

def test_nsfw_columns_and_params():
    from actors.nsfw import NSFWClassifier

    assert NSFWClassifier.columns({}) == (["id", "image"], ["nsfw_score", "nsfw", "nsfw_scores"])
    assert NSFWClassifier.columns({"image_column": "png"})[0] == ["id", "png"]
    for bad in (["FACE_FEMALE"], ["FEMALE_BREAST_COVERED"], ["BUTTOCKS_EXPOSED", "FACE_MALE"]):
        with pytest.raises(ValidationError, match="EXPOSED"):
            NSFWClassifier.Params(nudenet_classes=bad)
    with pytest.raises(ValidationError):
        NSFWClassifier.Params(surprise=1)


def test_nsfw_batch_equals_single_and_row_errors(nsfw, models, tmp_path):
    import torch
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    imgs = coco_images(5)
    items = [{"id": f"img-{k}", "image": p} for k, p in enumerate(imgs)]
    items.insert(2, {"id": "broken", "image": str(corrupt)})
    items.append({"id": "gone", "image": str(tmp_path / "missing.png")})
    batch = numpy_batch(items)
    out = nsfw(batch)
    err = list(out[rows.ROW_ERROR])
    assert err[2].startswith("InputError: row 'broken' field 'image': cannot decode image") and str(corrupt) in err[2]
    assert err[-1] == f"InputError: row 'gone' field 'image': image file not found: {tmp_path / 'missing.png'}"
    ok = [i for i, e in enumerate(err) if e is None]
    assert len(ok) == 5
    for i in (2, len(items) - 1):
        assert out["nsfw_score"][i] is None and out["nsfw"][i] is None and out["nsfw_scores"][i] is None
    for i in ok:
        score, flag, detail = out["nsfw_score"][i], out["nsfw"][i], json.loads(out["nsfw_scores"][i])
        assert isinstance(score, float) and isinstance(flag, bool) and 0.0 <= score <= 1.0
        assert set(detail) == {"normal", "nsfw"} and abs(sum(detail.values()) - 1) < 1e-5
        assert abs(detail["nsfw"] - score) < 1e-5 and flag == (score >= detail["normal"])
        one = nsfw(single(batch, i))                                    # batch == one by one
        assert one[rows.ROW_ERROR][0] is None and one["nsfw"][0] == flag
        assert abs(one["nsfw_score"][0] - score) < 1e-5
    # the pipeline's scores are the softmax of the model's own logits, label by label
    path = models["nsfw"]["path"]
    model = ViTForImageClassification.from_pretrained(path).eval()
    proc = ViTImageProcessor.from_pretrained(path)
    with torch.no_grad():
        pixels = proc(images=[Image.open(p).convert("RGB") for p in imgs], return_tensors="pt")
        probs = model(**pixels).logits.softmax(-1)
    nsfw_id = model.config.label2id["nsfw"]
    assert np.allclose([out["nsfw_score"][i] for i in ok], probs[:, nsfw_id].numpy(), atol=1e-5)


def test_nsfw_label_names_decide_the_rule(models, nsfw):
    from actors.nsfw import NSFWClassifier

    batch = numpy_batch([{"id": f"i{k}", "image": p} for k, p in enumerate(coco_images(4))])
    base = nsfw(batch)
    flipped = NSFWClassifier(models["nsfw"], {"unsafe_label": "normal", "safe_label": "nsfw", "num_threads": 1})(batch)
    for i in range(4):
        assert flipped["nsfw"][i] == (not base["nsfw"][i])          # no exact ties on real photos
        assert abs(flipped["nsfw_score"][i] - (1 - base["nsfw_score"][i])) < 1e-5
    with pytest.raises(ValueError, match=r"has labels \['normal', 'nsfw'\], not \['unsafe'\]"):
        NSFWClassifier(models["nsfw"], {"unsafe_label": "unsafe"})
    with pytest.raises(ValueError, match="needs backend"):
        NSFWClassifier({**models["nsfw"], "spec": {**models["nsfw"]["spec"], "backend": "open_clip"}}, {})


def test_nudenet_verdict_ignores_faces_and_covered_classes():
    dets = [{"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 5, 5]},
            {"class": "FEMALE_BREAST_COVERED", "score": 0.95, "box": [0, 0, 5, 5]},
            {"class": "FEET_EXPOSED", "score": 0.9, "box": [0, 0, 5, 5]},
            {"class": "BUTTOCKS_EXPOSED", "score": 0.4, "box": [0, 0, 5, 5]},
            {"class": "BUTTOCKS_EXPOSED", "score": 0.6, "box": [9, 9, 5, 5]}]
    assert S.nudenet_verdict(dets, S.NUDENET_DEFAULT_CLASSES, 0.5) == (0.6, True, {"BUTTOCKS_EXPOSED": 0.6})
    assert S.nudenet_verdict(dets, S.NUDENET_DEFAULT_CLASSES, 0.7)[1] is False
    assert S.nudenet_verdict(dets, ["FEET_EXPOSED"], 0.5) == (0.9, True, {"FEET_EXPOSED": 0.9})
    assert S.nudenet_verdict(dets[:2], S.NUDENET_DEFAULT_CLASSES, 0.0) == (0.0, False, {})
    assert "FACE_FEMALE" not in S.NUDENET_EXPOSED_LABELS
    assert all(c.endswith("_EXPOSED") for c in S.NUDENET_EXPOSED_LABELS)


def test_nudenet_missing_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    from actors import nsfw as nsfw_mod
    from actors.models import ModelSpec, ResolvedModel

    real = importlib.util.find_spec
    monkeypatch.setattr(nsfw_mod.importlib.util, "find_spec", lambda name, *a: None if name == "nudenet" else
                        real(name, *a))
    onnx = tmp_path / "320n.onnx"
    onnx.write_bytes(b"")
    model = ResolvedModel(spec=ModelSpec(backend="nudenet", model=str(onnx)), source="path", path=str(onnx))
    with pytest.raises(ImportError, match="optional package nudenet.*AGPL-3.0"):
        nsfw_mod.NSFWClassifier(model.model_dump(), {})
    if real("nudenet") is None:                       # the resolver says so before any actor starts
        with pytest.raises(ModelResolutionError, match="package 'nudenet' is not installed"):
            resolve({"backend": "nudenet", "model": "pkg:nudenet/320n.onnx"})


def test_nudenet_backend_when_installed(monkeypatch):
    """Only where a user installed the optional extra (never in this project's environment)."""
    pytest.importorskip("nudenet")
    from nudenet import NudeDetector

    from actors import nsfw as nsfw_mod

    faces = sorted(str(p) for p in (SHARED / "data" / "faces" / "deepface").glob("img1*.jpg"))[:3]
    files = faces + coco_images(3)
    clf = nsfw_mod.NSFWClassifier(resolve({"backend": "nudenet", "model": "pkg:nudenet/320n.onnx"}).model_dump(),
                                  {"batch_size": 4})
    seen = []
    verdict = nsfw_mod.nudenet_verdict
    monkeypatch.setattr(nsfw_mod, "nudenet_verdict", lambda d, *a: seen.append(d) or verdict(d, *a))
    batch = numpy_batch([{"id": f"n{k}", "image": p} for k, p in enumerate(files)])
    out = clf(batch)
    raw = [NudeDetector().detect(p) for p in files]
    assert seen == raw                      # batched, decoded by us (RGB -> BGR) == NudeNet reading the file
    assert any(d["class"].startswith("FACE_") for dets in raw for d in dets)     # faces found, never counted
    for i in range(len(files)):
        assert (out["nsfw_score"][i], out["nsfw"][i]) == verdict(raw[i], S.NUDENET_DEFAULT_CLASSES, 0.5)[:2]
        assert "FACE" not in out["nsfw_scores"][i]


# -- dialogue safety: labels -------------------------------------------------------------

def test_label_trie_spells_each_label_in_pieces(canary_t5):
    from actors.safety import label_trie, trie_constraint

    tok = canary_t5.tokenizer
    by_ids = canary_t5.label_by_ids
    assert sorted(by_ids.values()) == sorted(S.CANARY_LABELS)
    assert all(len(ids) >= 4 and ids[-1] == tok.eos_token_id for ids in by_ids)     # several pieces + EOS
    allowed = trie_constraint(canary_t5.trie, tok.pad_token_id)
    import torch

    start = [canary_t5.model.config.decoder_start_token_id]
    first = allowed(0, torch.tensor(start))
    assert len(first) == 1 and all(ids[0] == first[0] for ids in by_ids)               # all start with '▁__'
    needs = tok.convert_tokens_to_ids(["▁__", "needs", "_"])
    assert sorted(tok.convert_ids_to_tokens(allowed(0, torch.tensor(start + needs)))) == ["caution", "intervention"]
    done = next(ids for ids, label in by_ids.items() if label == "__casual__")
    assert allowed(0, torch.tensor(start + list(done))) == [tok.pad_token_id]
    with pytest.raises(ValueError, match="cannot spell the label '__casual__'"):
        label_trie(placeholders.tiny_t5_tokenizer(), S.CANARY_LABELS)   # no '_' piece: <unk>


def test_seq2seq_always_yields_a_label_with_its_probability(canary_t5):
    import torch

    texts = real_texts(32)
    res = canary_t5._generate(texts)
    labels = [r[0] for r in res]
    assert len(res) == 32 and set(labels) <= set(S.CANARY_LABELS)          # 32/32 valid
    assert len(set(labels)) >= 2                                            # the placeholder depends on the input
    # the score is the label's probability among the five under the trie-constrained model:
    # recompute all five by teacher forcing; they sum to 1 and the reported one matches
    model, tok = canary_t5.model, canary_t5.tokenizer
    start = model.config.decoder_start_token_id
    for text, (label, score) in list(zip(texts, res))[:4]:
        enc = tok([text], return_tensors="pt")
        probs = {}
        for ids, lab in canary_t5.label_by_ids.items():
            dec = torch.tensor([[start, *ids[:-1]]])
            with torch.no_grad():
                logits = model(**enc, decoder_input_ids=dec).logits[0]
            node, logp = canary_t5.trie, 0.0
            for t, tok_id in enumerate(ids):
                allowed = list(node)
                logp += float(torch.log_softmax(logits[t, allowed], -1)[allowed.index(tok_id)])
                node = node[tok_id]
            probs[lab] = float(np.exp(logp))
        assert abs(sum(probs.values()) - 1) < 1e-4
        assert abs(probs[label] - score) < 1e-4


def test_classifier_backend_scores_are_the_softmax(canary_bert, models):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert canary_bert.backend == "sequence-classification"
    texts = real_texts(12)
    res = canary_bert._classify(texts)
    model = AutoModelForSequenceClassification.from_pretrained(models["bert"]["path"]).eval()
    tok = AutoTokenizer.from_pretrained(models["bert"]["path"])
    with torch.no_grad():
        probs = model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits.softmax(-1)
    assert [r[0] for r in res] == [model.config.id2label[int(k)] for k in probs.argmax(-1)]
    assert np.allclose([r[1] for r in res], probs.max(-1).values.numpy(), atol=1e-5)
    assert len({r[0] for r in res}) >= 2


def test_backend_from_config_and_wrong_labels(models, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from actors.safety import DialogueSafetyClassifier

    auto = lambda m: {**m, "spec": {**m["spec"], "backend": "transformers"}}  # noqa: E731
    assert DialogueSafetyClassifier(auto(models["t5"]), {}).backend == "seq2seq"
    assert DialogueSafetyClassifier(auto(models["bert"]), {}).backend == "sequence-classification"
    model = AutoModelForSequenceClassification.from_pretrained(models["bert"]["path"])
    model.config.id2label = {i: f"class_{i}" for i in range(5)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(models["bert"]["path"]).save_pretrained(tmp_path)
    spec = resolve({"backend": "sequence-classification", "model": str(tmp_path)})
    with pytest.raises(ValueError, match="expected the Canary labels"):
        DialogueSafetyClassifier(spec.model_dump(), {})


def test_checkpoint_generation_settings_cannot_break_the_labels(models, canary_t5, tmp_path):
    """A checkpoint whose generation_config samples, searches beams, forces a first token (BART
    checkpoints set forced_bos_token_id) or suppresses EOS still yields the same labels: the
    stage decodes greedily with its own config."""
    import shutil

    from actors.safety import DialogueSafetyClassifier

    shutil.copytree(models["t5"]["path"], tmp_path / "t5", dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "t5" / "generation_config.json").read_text())
    cfg.update(do_sample=True, temperature=5.0, num_beams=3, forced_bos_token_id=5,
               suppress_tokens=[cfg["eos_token_id"]])
    (tmp_path / "t5" / "generation_config.json").write_text(json.dumps(cfg))
    hostile = DialogueSafetyClassifier(resolve({"backend": "seq2seq", "model": str(tmp_path / "t5")}).model_dump(), {})
    texts = real_texts(8)
    assert hostile._generate(texts) == canary_t5._generate(texts)


# -- dialogue safety: the actor on dialogues ---------------------------------------------

def dialogue_batch() -> tuple[list[dict], dict]:
    d = mirror_dialogues()
    items = [{"id": f"dlg-{k}", "utterances": utts} for k, utts in enumerate(d)]
    items.insert(1, {"id": "empty", "utterances": []})
    items.insert(3, {"id": "broken", "utterances": [{"speaker": "Client", "statement": "hi"},
                                                    {"speaker": "Therapist", "statement": None}]})
    items.append({"id": "as-json", "utterances": json.dumps(d[0][:3])})
    return items, numpy_batch(items)


@pytest.mark.parametrize("which", ["canary_t5", "canary_bert"])
def test_dialogue_batch_equals_single_and_row_errors(which, request):
    clf = request.getfixturevalue(which)
    items, batch = dialogue_batch()
    out = clf(batch)
    err = list(out[rows.ROW_ERROR])
    b = [r["id"] for r in items].index("broken")
    assert err[b] == "InputError: row 'broken' field 'utterances': utterance 1 has no 'statement'"
    assert out["safety_labels"][b] is None and out["safety_scores"][b] is None
    for i, item in enumerate(items):
        if i == b:
            continue
        assert err[i] is None
        utts = item["utterances"] if isinstance(item["utterances"], list) else json.loads(item["utterances"])
        labels, scores = out["safety_labels"][i], out["safety_scores"][i]
        assert out["safety_speakers"][i] == [u["speaker"] for u in utts]
        assert len(labels) == len(scores) == len(utts) and set(labels) <= set(S.CANARY_LABELS)
        assert all(isinstance(s, float) and 0 < s <= 1 for s in scores)
        one = clf(single(batch, i))                                          # batch == one by one
        assert one["safety_labels"][0] == labels
        assert np.allclose(one["safety_scores"][0], scores, atol=1e-4)
    assert out["safety_labels"][1] == [] and out["safety_speakers"][1] == []
    assert out["safety_labels"][-1] == out["safety_labels"][0][:3]          # JSON cell == list cell
    # every utterance is scored as itself: each label equals the label of its text alone
    fn = clf._generate if clf.backend == "seq2seq" else clf._classify
    utts = items[0]["utterances"]
    alone = [fn([u["statement"]])[0] for u in utts]
    assert out["safety_labels"][0] == [a[0] for a in alone]


def test_speakers_param_scores_only_therapist_lines(models, canary_t5):
    from actors.safety import DialogueSafetyClassifier

    items, batch = dialogue_batch()
    keep = [i for i, r in enumerate(items) if r["id"] != "broken"]
    batch = {k: v[keep] for k, v in batch.items()}
    everyone = canary_t5(batch)
    therapist = DialogueSafetyClassifier(models["t5"], {"speakers": ["THERAPIST"], "num_threads": 1})(batch)
    for i in range(len(keep)):
        for speaker, lab_all, lab_t, sc_t in zip(everyone["safety_speakers"][i], everyone["safety_labels"][i],
                                                 therapist["safety_labels"][i], therapist["safety_scores"][i]):
            if speaker == "Therapist":
                assert lab_t == lab_all and sc_t is not None
            else:
                assert lab_t is None and sc_t is None


def test_actor_called_directly_like_a_serve_replica(models):
    """Plain construction and a plain dict batch (Python lists), as a Ray Serve replica does."""
    from actors.nsfw import NSFWClassifier
    from actors.safety import DialogueSafetyClassifier

    clf = DialogueSafetyClassifier(model=resolve(BERT).model_dump(), params={"batch_size": 4})
    out = clf({"id": ["d1"], "utterances": [[{"speaker": "Client", "statement": "I can't sleep."},
                                             {"speaker": "Therapist", "statement": "Tell me more."}]]})
    assert out[rows.ROW_ERROR][0] is None and len(out["safety_labels"][0]) == 2
    png = io.BytesIO()
    from PIL import Image

    Image.open(coco_images(1)[0]).save(png, format="PNG")
    det = NSFWClassifier(model=resolve(NSFW).model_dump(), params={})
    res = det({"id": ["p1"], "image": [png.getvalue()]})
    assert res[rows.ROW_ERROR][0] is None and isinstance(res["nsfw"][0], bool)


# -- filters -----------------------------------------------------------------------------

def test_safety_rule_per_speaker():
    p = S.SafetyFilterParams()
    assert p.speakers == ["therapist"] and p.drop_labels == ["__needs_caution__", "__needs_intervention__"]
    speakers = ["Client", "Therapist", "Client", "Therapist"]
    batch = {"safety_speakers": [speakers] * 5,
             "safety_labels": [
                 ["__needs_intervention__", "__casual__", "__needs_caution__", "__probably_needs_caution__"],
                 ["__casual__", "__needs_caution__", "__casual__", "__needs_intervention__"],
                 ["__casual__", "__possibly_needs_caution__", "__casual__", "__casual__"],
                 [None, "__needs_caution__", None, None],               # client lines not classified
                 [],                                                      # no utterances
             ]}
    batch["safety_speakers"][4] = []
    out = S.safety_filter(batch, p)
    assert out[rows.ROW_REJECT] == [
        None,                                                   # client lines with bad labels never drop
        "safety: utterance 1 (Therapist) is __needs_caution__; utterance 3 (Therapist) is __needs_intervention__",
        None,
        "safety: utterance 1 (Therapist) is __needs_caution__",
        None]
    assert out["safety_flagged"] == [[], [1, 3], [], [1], []]
    assert S.safety_filter(batch, p, audit=True) == out                     # audit: same verdicts
    both = S.safety_filter(batch, {"speakers": None})
    assert both["safety_flagged"][0] == [0, 2] and both[rows.ROW_REJECT][0].startswith("safety: utterance 0 (Client)")
    strict = S.safety_filter(batch, {"drop_labels": ["__possibly_needs_caution__", "__probably_needs_caution__"]})
    assert strict["safety_flagged"] == [[3], [], [1], [], []]
    with pytest.raises(ValidationError, match="unknown Canary labels"):
        S.SafetyFilterParams(drop_labels=["needs_caution"])
    with pytest.raises(ValueError, match="3 safety labels for 4 speakers"):
        S.safety_flags(["__casual__"] * 3, speakers, p)


def test_dialogue_cells():
    ok = [{"speaker": "Therapist", "statement": "Hello.", "stage_direction": None, "t": 0}]
    assert S.dialogue_utterances(ok, "r", "u") == [("Therapist", "Hello.")]
    assert S.dialogue_utterances(np.asarray(ok, dtype=object), "r", "u") == [("Therapist", "Hello.")]
    assert S.dialogue_utterances(json.dumps(ok), "r", "u") == [("Therapist", "Hello.")]
    assert S.dialogue_utterances(None, "r", "u") == []
    assert S.dialogue_utterances([{"who": "C", "text": "x"}], "r", "u", "who", "text") == [("C", "x")]
    for bad, msg in (("not json", "malformed JSON dialogue"), (5, "expected a list of utterances"),
                     (["Therapist: hi"], "utterance 0 is a str"),
                     ([{"statement": "hi"}], "utterance 0 has no 'speaker'"),
                     ([{"speaker": "C", "statement": 3}], "utterance 0 'statement' is a int")):
        with pytest.raises(rows.InputError, match=f"row 'r' field 'u': {msg}"):
            S.dialogue_utterances(bad, "r", "u")


def test_nsfw_filter_single_and_per_dialogue_images():
    out = S.nsfw_filter({"nsfw": [True, False, [False, True, True], []],
                         "nsfw_score": [0.7314, 0.2, [0.1, 0.55, 0.912], []]})
    assert out[rows.ROW_REJECT] == ["nsfw: image flagged (nsfw_score 0.731)", None,
                                    "nsfw: images 1, 2 flagged (nsfw_score 0.550, 0.912)", None]
    assert out["nsfw_flagged"] == [[0], [], [1, 2], []]


def _control(table: pa.Table) -> pa.Table:
    for name in rows.CONTROL_COLUMNS:
        table = table.append_column(name, pa.array([rows.OK if name == rows.STATUS else ""] * table.num_rows,
                                                   pa.string()))
    return table


def test_filters_in_audit_mode_through_the_runtime(canary_t5, models):
    """Actor stage (placeholder) -> filter stage, through ``apply_stage`` as the pipeline runs them:
    audit mode records the verdicts in ``_audit``; without audit the same rows are rejected."""
    d = mirror_dialogues()
    table = _control(pa.Table.from_pylist(
        [{"id": f"dlg-{k}", "utterances": utts} for k, utts in enumerate(d)]
        + [{"id": "client-only", "utterances": [u for u in d[0] if u["speaker"] == "Client"]}]))
    cls_stage = Stage("dialogue_safety", "actors.safety:DialogueSafetyClassifier")
    _, outs = cls_stage.columns({})
    labelled = apply_stage(table, canary_t5, StageRun("dialogue_safety", tuple(outs), placeholder=True))
    assert labelled.column(rows.PLACEHOLDER).to_pylist() == ["dialogue_safety"] * 5
    # every label drops here, so each dialogue with a therapist line is a would-be reject
    flt = Stage("safety_filter", S.safety_filter, ("safety_labels", "safety_speakers"), ("safety_flagged",),
                filter=True, evidence=("dialogue_safety",), params_model=S.SafetyFilterParams)
    params = flt.validated_params({"drop_labels": list(S.CANARY_LABELS)})
    expected = []
    for labs, spk in zip(labelled.column("safety_labels").to_pylist(), labelled.column("safety_speakers").to_pylist()):
        hits = [f"utterance {j} (Therapist) is {lab}" for j, (lab, s) in enumerate(zip(labs, spk)) if s == "Therapist"]
        expected.append("safety: " + "; ".join(hits) if hits else None)
    assert expected[-1] is None and all(expected[:4])
    for audit in (True, False):
        run = StageRun("safety_filter", ("safety_flagged",), filter=True, audit=audit)
        res = apply_stage(labelled, functools.partial(S.safety_filter, params=params, audit=audit), run)
        status, reason, aud = (res.column(c).to_pylist() for c in (rows.STATUS, rows.REASON, rows.AUDIT))
        if audit:
            assert status == [rows.OK] * 5 and reason == [""] * 5
            assert aud == [f"safety_filter: {e}" if e else "" for e in expected]
        else:
            assert status == [rows.REJECTED] * 4 + [rows.OK] and reason[:4] == expected[:4] and aud == [""] * 5
    # NSFW: classifier stage then the filter; the labels swapped so that every image is flagged
    from actors.nsfw import NSFWClassifier

    swapped = NSFWClassifier(models["nsfw"], {"unsafe_label": "normal", "safe_label": "nsfw", "num_threads": 1})
    imgs = _control(pa.Table.from_pylist([{"id": f"i{k}", "image": p} for k, p in enumerate(coco_images(3))]))
    scored = apply_stage(imgs, swapped, StageRun("nsfw", ("nsfw_score", "nsfw", "nsfw_scores"), placeholder=True))
    assert scored.column("nsfw").to_pylist() == [True] * 3
    reasons = [f"nsfw: image flagged (nsfw_score {s:.3f})" for s in scored.column("nsfw_score").to_pylist()]
    for audit in (True, False):
        res = apply_stage(scored, functools.partial(S.nsfw_filter, params=None, audit=audit),
                          StageRun("nsfw_filter", ("nsfw_flagged",), filter=True, audit=audit))
        status, reason, aud = (res.column(c).to_pylist() for c in (rows.STATUS, rows.REASON, rows.AUDIT))
        assert res.column("nsfw_flagged").to_pylist() == [[0]] * 3
        if audit:
            assert status == [rows.OK] * 3 and aud == [f"nsfw_filter: {r}" for r in reasons]
        else:
            assert status == [rows.REJECTED] * 3 and reason == reasons


def test_dialogue_safety_in_a_ray_data_actor_pool(ray_local, models, canary_t5):
    """The same actor class as a Ray Data actor pool (list<struct> cells arrive as numpy arrays
    of dicts): results equal the direct call's."""
    from actors.safety import DialogueSafetyClassifier

    items = [r for r in dialogue_batch()[0] if r["id"] != "as-json"]
    got = {r["id"]: r for r in run_ray(ray_local, DialogueSafetyClassifier, models["t5"], {"batch_size": 8},
                                       items, batch_size=2)}
    direct = canary_t5(numpy_batch(items))
    assert sorted(got) == sorted(r["id"] for r in items)
    for i, r in enumerate(items):
        g = got[r["id"]]
        assert g[rows.ROW_ERROR] == direct[rows.ROW_ERROR][i]
        if direct[rows.ROW_ERROR][i] is None:
            assert list(g["safety_labels"]) == direct["safety_labels"][i]
            assert list(g["safety_speakers"]) == direct["safety_speakers"][i]
            assert np.allclose(list(g["safety_scores"]), direct["safety_scores"][i], atol=1e-4)
