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
