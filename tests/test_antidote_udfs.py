"""Antidote pure logic: ingest, rule checks, factual filter, memory bank, query templates."""
from __future__ import annotations

import json

import numpy as np
import pytest

from actors.memory_bank import MemoryBank
from jobs import antidote as J
from jobs.core.recipe import load_recipe
from udfs import antidote as A
from udfs import memory_bank as MB
from udfs import rows as R
from tests.conftest import SHARED


def _batch(**cols):
    out = {}
    for k, v in cols.items():
        arr = np.empty(len(v), dtype=object)
        for i, x in enumerate(v):
            arr[i] = x
        out[k] = arr
    return out


def test_rule_violations():
    good = {"present": ["cat", "sofa"], "no_exist": ["dog", "cushion"],
            "prompt": "a (cat:1.3) on a (sofa:1.2)", "prompt_neg": "(dog:1.2), (cushion:1.1)"}
    assert A.rule_violations(good) == []
    assert any("rule 5" in v for v in A.rule_violations({**good, "prompt": "a (cat:1.3) on a sofa"}))
    assert any("repeated" in v for v in A.rule_violations({**good, "prompt": "a cat (cat:1.3) on a (sofa:1.2)"}))
    assert any("rule 6" in v for v in A.rule_violations({**good, "prompt_neg": "(dog:1.2)"}))
    assert any("rule 2" in v for v in A.rule_violations({**good, "no_exist": ["cats", "cushion"],
                                                          "prompt_neg": "(cats:1.2), (cushion:1.1)"}))
    # plural in prompt vs singular in list still counts as embedded
    assert A.rule_violations({**good, "prompt": "two (cats:1.3) on a (sofa:1.2)"}) == []


def test_caption_fields_rejects_on_precheck():
    ok = json.dumps({"caption": "a cat", "present": ["cat"], "no-exist": ["dog"],
                     "prompt": "a (cat:1.2)", "prompt_neg": "(dog:1.1)"})
    bad = json.dumps({"caption": "a cat", "present": ["cat"], "no-exist": ["dog", "bird"],
                      "prompt": "a (cat:1.2)", "prompt_neg": "(dog:1.1)"})
    out = A.caption_fields(_batch(id=["a", "b"], caption_parse_parsed=[ok, bad]), None)
    assert out[R.ROW_REJECT][0] is None and out["no_exist"][0] == ["dog"]
    assert "rule 6" in out[R.ROW_REJECT][1]


def test_factual_filter_keeps_detected_present_and_undetected_absent():
    b = _batch(id=["a", "b", "c"], present=[["cat", "sofa"], ["cat"], ["man"]],
               no_exist=[["dog", "lamp"], ["dog"], ["hat"]],
               present_detected=[["cat"], [], ["man"]], no_exist_detected=[["lamp"], [], ["hat"]])
    out = A.factual_filter(b, None, audit=False)
    assert out["present_final"][0] == ["cat"] and out["no_exist_final"][0] == ["dog"]
    assert out[R.ROW_REJECT][0] is None
    assert "no present object detected" in out[R.ROW_REJECT][1]
    assert "every no-exist object was detected" in out[R.ROW_REJECT][2]
    audit = A.factual_filter(b, None, audit=True)  # verdicts identical, lists untouched
    assert audit[R.ROW_REJECT] == out[R.ROW_REJECT]
    assert audit["present_final"][1] == ["cat"] and audit["present_verified"][1] == []


def test_cpq_precheck_and_verdicts():
    b = _batch(id=["a", "b", "c", "d", "e"],
               hall_question=["What color is the dog?", "How many dogs are there?", "Is the dog brown?",
                              "What genre is the music?", "Can you see the dog's collar?"],
               hall_object=["dog", "dog", "dog", "music", "collar"])
    out = A.cpq_precheck(b, None)
    assert out[R.ROW_REJECT][0] is None
    assert "How many" in out[R.ROW_REJECT][1] and "yes/no" in out[R.ROW_REJECT][2]
    assert "sound/season" in out[R.ROW_REJECT][3]
    assert out[R.ROW_REJECT][4] is None  # modal starts are not the original's rule 4 (Is/Does/Are/Do...)
    fn = A.verdicts("j", "cpq_rules")
    v = fn(_batch(id=["a", "b"], j=['{"verdict": "pass"}', '{"verdict": "reject", "violated_rule": 2}']), None)
    assert v["cpq_rules_verdict"] == ["pass", "reject:2"] and "rule 2" in v[R.ROW_REJECT][1]


def test_question_fields_copies_without_judging():
    bad = json.dumps({"hall_question": "What breed is it?", "hall_object": "dog",
                      "truth_question": "Who are the men here?", "truth_object": "man"})
    out = A.question_fields(_batch(id=["b"], cpq_generate_parsed=[bad]), None)
    assert out["hall_question"] == ["What breed is it?"] and out["truth_object"] == ["man"]
    assert out.get(R.ROW_REJECT, [None]) == [None]  # the object-word rule is its own stage (cpq_object_words)


def test_extra_rules_are_separate_filters():
    """The two rules the original did not have: each its own filter stage (own funnel row)."""
    qs = ["Can you see the dog's collar?", "Would the cat like milk?", "Had the man eaten?", "What breed is the dog?",
          "Is the dog brown?"]
    out = A.cpq_modal_questions(_batch(id=list("abcde"), hall_question=qs), None)
    assert out["cpq_modal_start"] == ["can", "would", "had", "", ""]
    assert [r is not None for r in out[R.ROW_REJECT]] == [True, True, True, False, False]
    assert "cpq_modal_questions" in out[R.ROW_REJECT][0]
    b = _batch(id=["a", "b"], hall_question=["What breed is the dog?", "What breed is it?"], hall_object=["dog", "dog"],
               truth_question=["What is the man holding?", "Who are the men here?"], truth_object=["man", "man"])
    words = A.cpq_object_words(b, None)
    assert words["object_words_missing"] == ["", "hall_question"]
    assert words[R.ROW_REJECT][0] is None and "hall_question" in words[R.ROW_REJECT][1]


@pytest.mark.parametrize("profile", ["offline", "local", "paper"])
def test_extra_rules_are_recipe_switches_off_in_the_paper_profile(profile):
    from jobs.core.driver import plan

    r = load_recipe(J.RECIPE, "antidote", profile, input="x.jsonl", output="o")
    names = [sp.stage.name for sp in plan(J, r).row_stages()]
    extra = {"cpq_object_words", "cpq_modal_questions"}
    assert extra.isdisjoint(names) if profile == "paper" else extra <= set(names)
    if profile != "paper":  # before the memory bank / right after the original's pre-check
        assert names.index("cpq_fields") < names.index("cpq_object_words") < names.index("memory_add")
        assert names.index("cpq_precheck") < names.index("cpq_modal_questions") < names.index("cpq_judge_prompts")


def test_pope_fields_accepts_only_grammar_fixes():
    b = _batch(id=["a", "b", "c"], truth_object=["shoes", "dog", "cat"],
               pope_fix_parsed=['{"question": "Are there shoes in the image?"}',
                                '{"question": "What is the dog doing?"}', None])
    out = A.pope_fields(b, None)
    assert out["pope_question"] == ["Are there shoes in the image?", "Is there a dog in the image?",
                                    "Is there a cat in the image?"]
    assert out["pope_fixed"] == [True, False, False]


def test_query_templates_and_desc_determinism():
    b = _batch(id=["x1", "x2"], caption_rewritten=["a cat on a sofa", "a man"],
               present_final=[["cat"], ["man"]], no_exist_final=[["dog"], ["hat"]])
    one, two = A.desc_queries(b, None), A.desc_queries(b, None)
    assert one == two and all(t in A.DESCRIBE_QUESTIONS for t in one["desc_text"])
    assert "cat" in one["desc_hint"][0] and "dog" in one["desc_hint"][0]
    assert one["desc_hint"][0].endswith(one["desc_text"][0])
    rec = A.query_record("x1", "What color is the dog?", A.cpq_hint("dog", "What color is the dog?"))
    assert rec == {"id": "x1", "image": "images/x1.png", "text": "What color is the dog?",
                   "text_hint": rec["text_hint"]}
    assert "no dog" in rec["text_hint"] and rec["text_hint"].endswith("what color is the dog?")
    assert A.pope_hint("cat", "Is there a cat in the image?") == \
        "Hint: There is no cat in the image. Question: Is there a cat in the image?"


def test_memory_bank_threshold_activation_and_top_k():
    rng = np.random.default_rng(0)
    base = MB.normalize(rng.normal(size=(1, 16)))
    bank = MemoryBank(threshold=0.8, min_entries=5, top_k=3)
    near = [MB.normalize(base + 0.05 * rng.normal(size=(1, 16)))[0] for _ in range(4)]
    far = MB.normalize(rng.normal(size=(1, 16)))[0]
    bank.add(["a", "b", "c", "d"], [v.tolist() for v in near], ["q1", "q2", "q3", "q4"])
    assert bank.query([base[0].tolist()]) == [[]]  # 4 < min_entries: inactive
    bank.add(["e"], [far.tolist()], ["q5"])
    got = bank.query([base[0].tolist()])[0]
    assert len(got) == 3 and set(got) <= {"q1", "q2", "q3", "q4"}
    assert bank.add(["a"], [near[0].tolist()], ["again"]) == 5  # ids are added once
    with pytest.raises(ValueError):
        MB.similar_questions(np.zeros((600, 4)), ["q"] * 600, np.zeros((1, 8)), min_entries=1)


def test_memory_bank_actor_serializes_parallel_adds(ray_local):
    import ray

    bank = ray.remote(MemoryBank).options(num_cpus=0).remote(0.8, 0, 3)

    @ray.remote(num_cpus=0)
    def writer(k):
        vec = np.eye(8)[k % 8].tolist()
        return ray.get(bank.add.remote([f"id{k}-{j}" for j in range(25)], [vec] * 25,
                                       [f"q{k}-{j}" for j in range(25)]))
    ray.get([writer.remote(k) for k in range(8)])
    assert ray.get(bank.size.remote()) == 200  # no update lost under concurrent writers


@pytest.mark.parametrize("style", ["coco", "cc3m"])
def test_ingest_real_caption_pools(tmp_path, style):
    path = f"{SHARED}/data/captions/" + ("coco2017_mini.jsonl" if style == "coco" else "cc3m_val_subset.jsonl")
    r = load_recipe(J.RECIPE, "antidote", "offline", input=path, output=str(tmp_path), limit=50)
    table, rejects, _ = J.ingest(r)
    caps = table.column("caption").to_pylist()
    assert table.num_rows == 50 and len(set(caps)) == 50
    assert all(A.word_count(c) >= 8 for c in caps)
    assert all(x["reason"].startswith(("caption has", "duplicate caption")) for x in rejects)
    assert any(x["reason"].startswith("caption has") for x in rejects)
    again, _, _ = J.ingest(r)  # shuffle is seeded
    assert again.column("id").to_pylist() == table.column("id").to_pylist()


def test_ingest_formats_and_bad_records(tmp_path):
    words = "one two three four five six seven eight"
    (tmp_path / "pool.json").write_text(json.dumps({"k1": words, "k2": words, "k3": "too short"}))
    r = load_recipe(J.RECIPE, "antidote", "offline", input=str(tmp_path / "pool.json"), output="o")
    t, rej, _ = J.ingest(r)
    assert t.column("id").to_pylist() == ["k1"]
    assert {x["id"]: x["reason"] for x in rej} == {"k2": "duplicate caption of k1", "k3": "caption has 2 words (< 8)"}
    (tmp_path / "pool.jsonl").write_text(json.dumps({"id": "a", "caption": words}) + "\n{broken\n"
                                         + json.dumps({"id": "b"}) + "\n")
    t, rej, _ = J.ingest(r.model_copy(update={"input": str(tmp_path / "pool.jsonl")}))
    assert t.column("id").to_pylist() == ["a"]
    assert any("line 2: invalid JSON" in x["reason"] for x in rej)
    assert any(x["id"] == "b" and "field 'caption'" in x["reason"] for x in rej)
    (tmp_path / "pool.csv").write_text(f"id,caption\nc1,{words}\n")
    t, _, _ = J.ingest(r.model_copy(update={"input": str(tmp_path / "pool.csv")}))
    assert t.column("id").to_pylist() == ["c1"]


def test_prompt_builders_carry_the_row_and_the_avoid_list():
    b = _batch(id=["a"], caption_rewritten=["a man walking a dog"], present=[["man", "dog"]],
               no_exist=[["leash"]], prompt_weighted=["a (man:1.2) walking a (dog:1.3)"], prompt_neg=["(leash:1.1)"],
               present_final=[["man", "dog"]], no_exist_final=[["leash"]],
               avoid_questions=[["What color is the leash?"]], hall_question=["What color is the leash?"],
               hall_object=["leash"], truth_question=["What is the man doing?"], truth_object=["man"])
    judge = json.loads(A.judge_prompts(b, None)["messages"][0])
    assert judge[0]["role"] == "system" and '"no-exist": ["leash"]' in judge[1]["content"]
    q = json.loads(A.question_prompts(b, None)["messages"][0])[1]["content"]
    assert "Do not write questions resembling" in q and "What color is the leash?" in q
    b2 = {**b, "avoid_questions": _batch(x=[[]])["x"]}
    assert "resembling" not in json.loads(A.question_prompts(b2, None)["messages"][0])[1]["content"]
    pope = json.loads(A.pope_prompts(b, None)["messages"][0])[1]["content"]
    assert "Is there a man in the image?" in pope
    cj = json.loads(A.cpq_judge_prompts(b, None)["messages"][0])[1]["content"]
    assert '"hall_object": "leash"' in cj


def test_image_paths_match_the_generator_file_names():
    from udfs.images import image_file_name

    assert A.image_rel_path("coco-1") == "images/coco-1.png"
    assert A.image_rel_path("img 1") == "images/" + image_file_name("img 1") != "images/img 1.png"


def _export_rows():
    """Committed rows as the driver hands them to export: one that finished, and rows stopped
    at the parse, the judge, the factual filter and the CPQ judge."""
    import pyarrow as pa

    def row(rid, status="ok", stage="", parsed=True, detected=True, final=True, pair=True, pope=True):
        r = {"id": rid, "caption": f"pool caption {rid}", R.STATUS: status, R.STAGE: stage, R.REASON: "",
             R.PLACEHOLDER: "", R.AUDIT: "", "caption_rewritten": None, "present": None, "no_exist": None,
             "prompt_weighted": None, "prompt_neg": None, "present_detected": None, "no_exist_detected": None,
             "present_scores": None, "no_exist_scores": None, "present_final": None, "no_exist_final": None,
             "present_verified": None, "no_exist_verified": None, "hall_question": None, "hall_object": None,
             "truth_question": None, "truth_object": None, "pope_question": None, "desc_text": None,
             "desc_hint": None, "image": None}
        if parsed:
            r.update(caption_rewritten=f"a cat and a sofa {rid}", present=["cat", "sofa"], no_exist=["dog", "lamp"],
                     prompt_weighted="a (cat:1.2) and a (sofa:1.1)", prompt_neg="(dog:1.2), (lamp:1.1)")
        if detected:
            r.update(image=f"/out/images/{rid}.png", present_detected=["cat", "cat"], no_exist_detected=["lamp"], present_scores=[0.9, 0.8],
                     no_exist_scores=[0.5])
        if final:
            r.update(present_final=["cat"], no_exist_final=["dog"], present_verified=["cat"], no_exist_verified=["dog"],
                     desc_text="Describe this image in detail.", desc_hint="Hint: ...")
        if pair:
            r.update(hall_question="What color is the dog?", hall_object="dog", truth_question="What is the cat doing?",
                     truth_object="cat")
        if pope:
            r.update(pope_question="Is there a cat in the image?")
        return r
    rows_ = [row("r1"),
             row("r2", "rejected", "caption_parse", parsed=False, detected=False, final=False, pair=False, pope=False),
             row("r3", "rejected", "caption_verdict", detected=False, final=False, pair=False, pope=False),
             row("r4", "rejected", "factual_filter", final=False, pair=False, pope=False),
             row("r5", "rejected", "cpq_verdict", pope=False)]
    return pa.Table.from_pylist(rows_)


def test_export_writes_the_original_schema_and_step_files(tmp_path):
    import pyarrow.parquet as pq

    r = load_recipe(J.RECIPE, "antidote", "local", input="x.jsonl", output=str(tmp_path))
    counts = J.export(_export_rows(), r, str(tmp_path))
    final = pq.read_table(tmp_path / "captions_final.parquet").to_pylist()
    assert [f["id"] for f in final] == ["r1", "r5"] and counts["captions_final"] == 2
    f = final[0]  # the original's final names with the original's meanings (SPEC C5)
    assert f["caption"] == "a cat and a sofa r1" and f["pool_caption"] == "pool caption r1"
    assert f["present"] == ["cat"] and f["no-exist"] == ["dog"]  # filtered lists
    assert f["present_parsed"] == ["cat", "sofa"] and f["no_exist_parsed"] == ["dog", "lamp"]
    assert f["prompt"] == "a (cat:1.2) and a (sofa:1.1)" and f["image"] == "images/r1.png"

    def read(name):
        return [json.loads(line) for line in (tmp_path / "steps" / name).read_text().splitlines()]
    caps = read("generated_captions.jsonl")  # C1: every parsed item, the LLM's lists
    assert [c["id"] for c in caps] == ["r1", "r3", "r4", "r5"]
    assert caps[0] == {"caption": "a cat and a sofa r1", "present": ["cat", "sofa"], "no-exist": ["dog", "lamp"],
                       "prompt": "a (cat:1.2) and a (sofa:1.1)", "prompt_neg": "(dog:1.2), (lamp:1.1)", "id": "r1"}
    assert [c["id"] for c in read("generated_captions_filtered.jsonl")] == ["r1", "r4", "r5"]  # C2
    grounding = read("infer_grounding_res.jsonl")  # C4: unique detected phrases
    assert grounding[0] == {"idx": "r1", "present": ["cat"], "no-exist": ["lamp"]} and len(grounding) == 3
    fin = read("generated_captions_final.jsonl")  # C5
    assert fin[0] == {"caption": "a cat and a sofa r1", "present": ["cat"], "no-exist": ["dog"],
                      "prompt": "a (cat:1.2) and a (sofa:1.1)", "prompt_neg": "(dog:1.2), (lamp:1.1)", "idx": "r1"}
    assert [x["idx"] for x in fin] == ["r1", "r5"]
    pairs = read("query_cpq_tpq_list.jsonl")  # C6 3-1-1
    assert [x["idx"] for x in pairs] == ["r1", "r5"] and set(pairs[0]) == {
        "hall_question", "hall_object", "truth_question", "truth_object", "idx"}
    assert [x["idx"] for x in read("query_tpq_cpq_list_filtered.jsonl")] == ["r1"]  # 3-1-2
    assert read("query_pope_list.jsonl") == [{"truth_question": "Is there a cat in the image?", "truth_object": "cat",
                                              "idx": "r1"}]  # 3-2-1 template
    assert read("query_pope_list_filtered.jsonl")[0]["truth_question"] == "Is there a cat in the image?"  # 3-2-2
    assert [json.loads(x)["id"] for x in (tmp_path / "queries" / "cpq_list.jsonl").read_text().splitlines()] == ["r1"]


def test_antidote_image_stage_keeps_its_negative_prompt():
    """Antidote's no-exist objects are the negative prompt (SPEC C3): every profile must run the
    image stage with guidance > 1, and a recipe that would silently drop them is refused."""
    from jobs.core.driver import PlanError, plan

    for profile in ("offline", "local", "paper"):
        r = load_recipe(J.RECIPE, "antidote", profile, input="x.jsonl", output="o")
        assert r.stages["generate_images"].params["guidance_scale"] > 1
        plan(J, r)
    turbo = load_recipe(J.RECIPE, "antidote", "local", input="x.jsonl", output="o",
                        overrides=["generate_images.params.guidance_scale=0.0"])
    with pytest.raises(PlanError, match="generate_images.*guidance_scale 0.0"):
        plan(J, turbo)


def test_memory_bank_threshold_for_minilm_measured_on_real_captions():
    """The 0.8 of 3-1-1 was set for bge-m3. Measured with all-MiniLM-L6-v2 on the 795 real COCO
    captions (159 images x 5): the numbers udfs/memory_bank.py and the recipes state."""
    from actors.embedding import TextEmbedder
    from actors.models import resolve

    caps = [json.loads(line) for line in open(f"{SHARED}/data/captions/coco2017_mini.jsonl")]
    r = load_recipe(J.RECIPE, "antidote", "offline", input="x", output="o")
    model = resolve(r.stages["caption_embed"].model).model_dump()
    emb = np.stack(TextEmbedder(model, {"text_column": "caption", "output_column": "e"})(
        {"caption": [c["caption"] for c in caps]})["e"])
    image = np.array([c["image_id"] for c in caps])
    iu = np.triu_indices(len(caps), 1)
    sims = (emb @ emb.T)[iu]
    same = image[iu[0]] == image[iu[1]]
    assert same.sum() == 1590 and (~same).sum() == 314025
    above = {t: (float(np.mean(sims[same] > t)), int(np.sum(sims[~same] > t))) for t in (0.7, 0.8)}
    assert 0.11 <= above[0.8][0] <= 0.13 and 30 <= above[0.8][1] <= 50  # 0.8: 12.1 % same-image, 41 others
    assert 0.34 <= above[0.7][0] <= 0.37 and 240 <= above[0.7][1] <= 300  # 0.7: 35.4 % same-image, 267 others
    assert abs(float(np.median(sims[same])) - 0.642) < 0.01 and abs(float(np.percentile(sims[~same], 99.9)) - 0.691) < 0.01
    for profile, t in (("offline", MB.MINILM_THRESHOLD), ("local", MB.MINILM_THRESHOLD), ("paper", MB.THRESHOLD)):
        assert load_recipe(J.RECIPE, "antidote", profile, input="x", output="o").bank_threshold == t
