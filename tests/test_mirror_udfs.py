"""MIRROR text udfs: intake parser (real Cactus records), persona, dedupe, record completion
helpers, line parser and grammar, identity assignment, dialogue filters, group-by drop."""
from __future__ import annotations

import collections
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from udfs import mirror_completion as completion
from udfs import mirror_identity as identity
from udfs import mirror_intake as intake
from udfs import mirror_screenplay as screenplay
from udfs import mirror_dialogue as D
from udfs import rows as R

REPO = Path(__file__).resolve().parents[1]
CACTUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "counseling" / "cactus_eval_intake.jsonl"


@pytest.fixture(scope="module")
def cactus_rows():
    if not CACTUS.exists():
        pytest.skip(f"{CACTUS} not present")
    return [json.loads(line) for line in CACTUS.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- intake forms

def test_intake_values_on_next_line_real_record(cactus_rows):
    row = cactus_rows[0]
    assert row["id"] == "cactus-eval-000" and "Name:\nLaura Saunders\n" in row["intake_form"]
    form = intake.parse_intake_form(row["intake_form"])
    assert form["personal_info"] == {
        "name": "Laura Saunders", "age": "45", "gender": "female", "occupation": "Office Job",
        "education": "College Graduate", "marital status": "Single", "family details": "Lives alone"}
    assert form["presenting_problem"].startswith("I am struggling with the thought that I can't run far")
    assert form["reason_counseling"] == row["reason_counseling"]
    assert form["sections"]["academic/occupational functioning level"].startswith("My job performance")


def test_intake_bare_keys_real_record(cactus_rows):
    row = next(r for r in cactus_rows if r["id"] == "cactus-eval-039")
    info = intake.parse_intake_form(row["intake_form"])["personal_info"]
    assert info == {"name": "Christopher Tate", "age": "21", "gender": "male", "occupation": "",
                    "education": "", "marital status": "", "family details": "- Lives with a pet dog"}


def test_intake_all_real_clients(cactus_rows):
    recs = [intake.client_record(r, i) for i, r in enumerate(cactus_rows)]
    for rec, row in zip(recs, cactus_rows):
        info = json.loads(rec["personal_info"])
        assert tuple(info) == intake.PERSONAL_KEYS, row["id"]
        assert rec["name"] and rec["age"] and rec["face_gender"] in ("Man", "Woman"), row["id"]
        assert rec["presenting_problem"] and rec["reason_counseling"] == row["reason_counseling"].strip()
        assert rec["missing_fields"] == ["thought", "patterns", "cbt_plan"]  # the bundled file lacks them
    assert collections.Counter(r["face_gender"] for r in recs) == {"Woman": 228, "Man": 222}


def test_intake_synthetic_layouts_and_errors():
    form = ("1. Client Information\nName: Ana Ruiz\nAge: 33\nGender: Female\nOccupation:\nNurse\n\n"
            "2. Presenting Problem\nI think I always fail.\n1. A numbered item inside the section\n"
            "3. Another item that ends like a sentence.\n\n"
            "3. Reason for Seeking Counseling\nMy doctor suggested it.\n\n"
            "5. Occupational Functioning Level: Fine at work.\n")
    parsed = intake.parse_intake_form(form)
    assert parsed["personal_info"] == {"name": "Ana Ruiz", "age": "33", "gender": "Female", "occupation": "Nurse"}
    assert parsed["presenting_problem"] == ("I think I always fail.\n1. A numbered item inside the section\n"
                                            "3. Another item that ends like a sentence.")
    assert parsed["reason_counseling"] == "My doctor suggested it."
    assert parsed["sections"]["occupational functioning level"] == "Fine at work."   # 4 skipped: fine
    with pytest.raises(intake.IntakeFormError):
        intake.parse_intake_form("")
    with pytest.raises(intake.IntakeFormError):
        intake.parse_intake_form(None)
    with pytest.raises(intake.IntakeFormError, match="no personal-info block"):
        intake.parse_intake_form("2. Presenting Problem\nsomething")


def test_persona_and_fields(cactus_rows):
    rec = intake.client_record(cactus_rows[0], 0)
    assert rec["client_persona"] == ("Laura Saunders is a 45-year-old female whose occupation is Office Job. "
                                     "Education: College Graduate. Marital status: Single. Family: Lives alone.")
    assert rec["age"] == 45.0 and rec["age_group"] == 50 and rec["face_gender"] == "Woman"
    tate = intake.client_record(next(r for r in cactus_rows if r["id"] == "cactus-eval-039"), 117)
    assert tate["client_persona"] == "Christopher Tate is a 21-year-old male. Family: Lives with a pet dog."
    assert intake.client_persona({}) == "The client is a client."
    assert intake.client_persona({"name": "Jo", "occupation": "Chef"}) == "Jo works as Chef."
    assert [intake.age_group(a) for a in (44, 45, 35, "25 years", None, "n/a")] == [40, 50, 40, 30, None, None]
    assert [intake.normalize_gender(g) for g in ("female", " Male", "Woman", "Man", "non-binary", None)] == \
        ["Woman", "Man", "Woman", "Man", None, None]


def test_full_cactus_row_needs_no_completion():
    row = {"intake_form": "Name: Bo Li\nAge: 52\nGender: male\n\n2. Presenting Problem\nX.\n\n"
                          "3. Reason for Seeking Counseling\nY.",
           "thought": "I ruin everything.", "patterns": "['labeling', 'overgeneralization']",
           "cbt_plan": "Reality Testing\n1. Step one: a.\n2. Step two: b."}
    rec = intake.client_record(row, 7)
    assert rec["client_id"] == "cactus-7" and rec["missing_fields"] == []
    assert rec["patterns"] == ["labeling", "overgeneralization"]
    assert rec["cbt_plan"] == "1. Step one: a.\n2. Step two: b."
    assert intake.parse_patterns("a, b") == ["a", "b"] and intake.parse_patterns(float("nan")) == []
    # Cactus' own technique column is read (issue 18 item 2); ground_truth_cbt is the eval file's
    assert rec["cbt_techniques"] == []
    named = intake.client_record({**row, "cbt_technique": "Reality Testing",
                                  "ground_truth_cbt": ["Decatastrophizing"]}, 7)
    assert named["cbt_techniques"] == ["Reality Testing"] and named["derived_fields"] == []
    assert intake.client_record({**row, "cbt_technique": "['Pie Chart Technique']"}, 7)["cbt_techniques"] == \
        ["Pie Chart Technique"]
    assert intake.client_record({**row, "ground_truth_cbt": ["Decatastrophizing"]}, 7)["cbt_techniques"] == \
        ["Decatastrophizing"]


def test_dedupe_real_file(cactus_rows):
    recs = [intake.client_record(r, i) for i, r in enumerate(cactus_rows)]
    reasons = intake.dedupe_clients([r["client_id"] for r in recs], [r["client_key"] for r in recs])
    assert sum(r is None for r in reasons) == 150
    assert reasons[:4] == [None, "duplicate of cactus-eval-000", "duplicate of cactus-eval-000", None]
    kept = [r for r, why in zip(recs, reasons) if why is None]
    assert len({r["client_key"] for r in kept}) == 150
    # whitespace differences do not make a new client
    assert intake.client_key("Name: A\n\nAge: 3") == intake.client_key("Name:  A\nAge:\t3 ")


def test_plan_filter_and_extraction():
    assert intake.extract_numbered_plan("Intro\n1. First: x\n2. Second: y") == "1. First: x\n2. Second: y"
    assert intake.extract_numbered_plan("1. Only: z") == "1. Only: z"
    assert intake.extract_numbered_plan("Use reality testing. Step 11. no") is None
    out = intake.plan_filter({"cbt_plan": np.array(["1. a\n2. b", None, "no plan"], dtype=object)},
                        intake.PlanFilterParams())
    assert out["has_numbered_plan"] == [True, False, False]
    assert out[R.ROW_REJECT][0] is None
    assert out[R.ROW_REJECT][1].startswith("no numbered CBT plan") and "'no plan'" in out[R.ROW_REJECT][2]


# ----------------------------------------------------------------------------- completion

def test_thought_helpers(cactus_rows):
    rec = intake.client_record(cactus_rows[0], 0)
    assert completion.heuristic_thought(rec["presenting_problem"]) == "I can't run far, despite enjoying running as a hobby."
    assert completion.heuristic_thought("I feel useless. Nothing works.") == "I feel useless."
    assert completion.heuristic_thought("") is None
    msgs = completion.thought_messages(rec)
    assert [m["role"] for m in msgs] == ["system", "user"] and "can't run far" in msgs[1]["content"]
    assert completion.validate_thought('"I always fail at everything."') == "I always fail at everything."
    for bad in ("two\nlines here now", "too short", " ".join(["word"] * 41), None):
        with pytest.raises(ValueError):
            completion.validate_thought(bad)
    completion.DistortedThoughtReply.model_validate({"thought": "I will never be good enough."})
    with pytest.raises(ValueError):  # newlines are rejected by validate_thought (no schema pattern: xgrammar)
        completion.DistortedThoughtReply.model_validate({"thought": "short"})


def test_distortion_labels_and_parsing():
    assert len(completion.DISTORTION_LABELS) == 10 and "fortune-telling" in completion.DISTORTION_LABELS
    msgs = completion.distortion_messages("Everyone will laugh at me.", "A talk at work.")
    assert all(lab in msgs[0]["content"] for lab in completion.DISTORTION_LABELS)
    assert completion.parse_distortions('{"distortions": ["Fortune telling", "labelling", "fortune-telling"]}') == \
        ["fortune-telling", "labeling"]
    assert completion.parse_distortions("This is mind reading and catastrophizing.") == ["mind reading", "magnification"]
    assert completion.parse_distortions(["all or nothing", "x", "Should statements", "mental filter", "labeling"]) == \
        ["all-or-nothing thinking", "should statements", "mental filter"]
    with pytest.raises(ValueError):
        completion.parse_distortions('{"distortions": ["anxiety"]}')
    completion.DistortionReply.model_validate({"distortions": ["labeling"]})
    with pytest.raises(ValueError):
        completion.DistortionReply.model_validate({"distortions": ["anxiety"]})
    with pytest.raises(ValueError):
        completion.DistortionReply.model_validate({"distortions": []})


def test_plan_helpers():
    assert len(completion.CBT_TECHNIQUES) == 12 and completion.FALLBACK_TECHNIQUE in completion.CBT_TECHNIQUES
    rec = {"client_persona": "Jo is a 30-year-old male.", "reason_counseling": "r", "thought": "t",
           "patterns": ["labeling"]}
    chosen = completion.plan_messages(rec)[0]["content"]
    assert all(t in chosen for t in completion.CBT_TECHNIQUES)
    fixed = completion.plan_messages(rec, "Role-playing and Simulation")[0]["content"]
    assert "Role-playing and Simulation" in fixed and "Systematic Exposure" not in fixed
    reply = json.dumps({"technique": "Reality Testing",
                        "steps": ["1. Look: we list facts", "Test: we check one belief", "Step 3) Review: we compare"]})
    tech, plan = completion.plan_from_reply(reply)
    assert tech == "Reality Testing"
    assert plan == "1. Look: we list facts\n2. Test: we check one belief\n3. Review: we compare"
    assert completion.plan_from_reply(reply, "reality testing")[0] == "reality testing"
    with pytest.raises(ValueError, match="expected"):
        completion.plan_from_reply(reply, "Decatastrophizing")
    # the schema's enum (constrained decoding) admits only the twelve names, spelled as listed
    for bad_name in ("Hypnosis", "reality testing"):
        with pytest.raises(ValueError, match="Input should be"):
            completion.plan_from_reply({"technique": bad_name, "steps": ["a long enough step"] * 3})
    with pytest.raises(ValueError, match="at least 12 characters"):
        completion.plan_from_reply({"technique": "Reality Testing", "steps": ["a", "b", "c"]})
    with pytest.raises(ValueError):
        completion.plan_from_reply('{"technique": "Reality Testing", "steps": ["a long enough step"]}')
    template = completion.template_plan("Reality Testing", "I always fail.")
    assert template.startswith("1. Introduce Reality Testing") and template.count("\n") == 3
    assert intake.plan_reject_reason(template) is None


def test_apply_completion_marks_derived(cactus_rows):
    rec = intake.client_record(cactus_rows[0], 0)
    done = completion.apply_completion(rec, thought="I can't run far.", patterns=["labeling"],
                              plan="1. A: x\n2. B: y\n3. C: z", method="llm")
    assert done["derived_fields"] == ["thought:llm", "patterns:llm", "cbt_plan:llm"]
    assert done["missing_fields"] == [] and rec["missing_fields"] == ["thought", "patterns", "cbt_plan"]
    assert intake.plan_filter({"cbt_plan": [done["cbt_plan"]]}, None)[R.ROW_REJECT] == [None]
    # source values are never overwritten; a plan without numbering stays missing
    full = {**done, "missing_fields": ["cbt_plan"], "derived_fields": [], "cbt_techniques": []}
    again = completion.apply_completion(full, thought="other", plan="no numbers", technique="Reality Testing",
                               method="heuristic")
    assert again["thought"] == "I can't run far." and again["missing_fields"] == ["cbt_plan"]
    # a technique is recorded only with the plan it belongs to (issue 18 item 2)
    assert again["derived_fields"] == [] and again["cbt_techniques"] == []
    source_plan = {**done, "missing_fields": [], "derived_fields": [], "cbt_techniques": []}
    kept = completion.apply_completion(source_plan, technique="Decatastrophizing", plan="1. X: y\n2. Z: w\n3. V: u")
    assert kept["cbt_techniques"] == [] and kept["cbt_plan"] == done["cbt_plan"] and kept["derived_fields"] == []
    both = completion.apply_completion({**done, "missing_fields": ["cbt_plan"], "derived_fields": [],
                                        "cbt_techniques": []}, technique="Decatastrophizing",
                                       plan="1. X: y\n2. Z: w\n3. V: u")
    assert both["cbt_techniques"] == ["Decatastrophizing"] and both["cbt_plan"].startswith("1. X: y")
    assert both["derived_fields"] == ["cbt_plan:llm", "cbt_techniques:llm"]


# ----------------------------------------------------------------------------- screenplay

def _completed(cactus_rows):
    rec = intake.client_record(cactus_rows[0], 0)
    return completion.apply_completion(rec, thought="I can't run far.", patterns=["labeling"],
                              plan="1. Facts: we list runs.\n2. Test: we try one.\n3. Review: we compare.")


def test_screenplay_rows_and_prompt(cactus_rows):
    rec = _completed(cactus_rows)
    rows = screenplay.screenplay_rows({**rec, "row_index": 3})
    assert [r["id"] for r in rows] == ["cactus-3-emotional-resistance", "cactus-3-cognitive-resistance",
                                       "cactus-3-behavioral-resistance", "cactus-3-no-resistance"]
    assert [r["resistance"] for r in rows] == ["Emotional Resistance", "Cognitive Resistance",
                                               "Behavioral Resistance", "No Resistance"]
    with pytest.raises(KeyError):
        screenplay.screenplay_id(1, "angry")
    prompt = screenplay.default_screenplay_prompt()
    assert json.loads(json.dumps(prompt)) == prompt and len(prompt["few_shot"]) == 2
    msgs = screenplay.screenplay_messages(rec, "cognitive-resistance", prompt)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    block = msgs[-1]["content"]
    for part in ("Client Information", rec["client_persona"], "Cognitive Resistance", "I can't run far.",
                 "labeling", rec["reason_counseling"], "1. Facts: we list runs.", "First Session Counseling"):
        assert part in block
    assert screenplay.SCREENPLAY_SAMPLING == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 1024,
                                     "frequency_penalty": 0.2, "presence_penalty": 0.2}
    # our few-shot answers are themselves valid under the grammar and parse completely
    for _, answer in screenplay.SCREENPLAY_FEW_SHOT:
        turns, bad = screenplay.parse_screenplay(answer)
        assert bad == [] and len(turns) == 10
        assert screenplay.grammar_accepts(screenplay.screenplay_grammar(), answer + "\n")


def test_line_parser_and_fallbacks():
    assert screenplay.parse_line("Therapist: [warm smile]  Hello there. ") == \
        {"speaker": "Therapist", "stage_direction": "warm smile", "statement": "Hello there."}
    assert screenplay.parse_line("Laura Saunders: [sighs] I guess.", "Laura Saunders") == \
        {"speaker": "Client", "stage_direction": "sighs", "statement": "I guess."}
    assert screenplay.parse_line("Laura: [sighs] Fine.", "Laura Saunders")["speaker"] == "Client"
    assert screenplay.parse_line("Client: No bracket here.") == \
        {"speaker": "Client", "stage_direction": None, "statement": "No bracket here."}
    assert screenplay.parse_line("Laura: plain", "Laura Saunders")["stage_direction"] is None
    assert screenplay.parse_line("Client: [] Empty direction.")["stage_direction"] == ""
    for bad in ("", "   ", "The client: [nods] yes", "The client is on a mission.", "Laura: [x] y"):
        assert screenplay.parse_line(bad) is None, bad
    text = "Therapist: [calm] Hi.\n\nThe client looks away.\nClient: [tense] Hello.\nNarrator: x"
    turns, bad = screenplay.parse_screenplay(text)
    assert [t["speaker"] for t in turns] == ["Therapist", "Client"]
    assert bad == ["The client looks away.", "Narrator: x"]


def _pairs(n: int, direction: str = "calm", statement: str = "Okay, tell me more.") -> str:
    return "".join(f"Therapist: [{direction}] {statement}\nClient: [tense] I am not sure.\n" for _ in range(n))


def test_grammar_accepts_valid_and_rejects_invalid():
    ebnf, regex = screenplay.screenplay_grammar(), screenplay.screenplay_regex()
    valid = [_pairs(4), _pairs(20), _pairs(6, "leans forward, smiling", "It's fine - really.")]
    for text in valid:
        assert screenplay.grammar_accepts(ebnf, text), text
        assert screenplay.grammar_accepts(regex, text, kind="regex")
        assert screenplay.grammar_accepts(regex, text[:-1], kind="regex")   # final newline optional
        assert re.fullmatch(regex, text[:-1])                       # what OutputFormat.validate runs
        turns, bad = screenplay.parse_screenplay(text)
        assert not bad and len(turns) == 2 * text.count("Therapist:")
    invalid = [
        _pairs(3),                                                   # too few pairs (turn count < 4)
        _pairs(21),                                                  # too many pairs
        _pairs(4).replace("Client:", "The client:", 1),              # narration speaker
        _pairs(4).replace("[calm]", "[nods)", 1),                    # mismatched bracket
        _pairs(4).replace("[calm]", "calm", 1),                      # no stage direction
        "Client: [tense] Hi.\n" + _pairs(4),                         # client first
        _pairs(4).replace("tell me more.", "tell [me] more.", 1),    # bracket inside the statement
        _pairs(4).replace("[calm]", "[]", 1),                        # empty direction
        _pairs(4).replace("more.", "more.  \nClient: [x] extra", 1), # unpaired line
        _pairs(4) + "Therapist: [calm] Bye.\n",                      # dangling therapist line
    ]
    for text in invalid:
        assert not screenplay.grammar_accepts(ebnf, text), text
        assert not screenplay.grammar_accepts(regex, text, kind="regex"), text
    assert not screenplay.grammar_accepts(ebnf, _pairs(4).replace("calm", "caf\u00e9", 1))
    small = screenplay.screenplay_grammar(min_pairs=1, max_pairs=2, max_direction=5, max_statement=10)
    assert screenplay.grammar_accepts(small, "Therapist: [calm] Hi.\nClient: [sad] No.\n")
    assert not screenplay.grammar_accepts(small, "Therapist: [calmly] Hi.\nClient: [sad] No.\n")
    with pytest.raises(ValueError):
        screenplay.screenplay_grammar(min_pairs=5, max_pairs=4)
    with pytest.raises(ValueError):
        screenplay.screenplay_regex(max_statement=0)


def test_grammar_output_format_roundtrip():
    from udfs.llm_output import OutputValidationError, output_format

    fmt = output_format(regex=screenplay.screenplay_regex())
    assert fmt.validate(_pairs(5)) is None
    with pytest.raises(OutputValidationError):
        fmt.validate("Sure! Here is the dialogue:\n" + _pairs(5))


# ----------------------------------------------------------------------------- identities

def _pool():
    pool = []
    for g in ("Man", "Woman"):
        for age in (22, 28, 38, 41, 63):
            pool.append({"identity": f"{g[0]}{age}", "gender": g, "age": float(age), "img_path": f"{g}{age}.jpg"})
    return pool


def _dialogues(n: int, gender: str = "female", age: int = 45):
    return [{"id": f"cactus-{i}-no-resistance", "gender": gender, "age": age} for i in range(n)]


def test_identity_same_gender_nearest_group_and_determinism():
    pool = _pool()
    dias = _dialogues(40, "female", 44)
    out = identity.assign_identities(dias, pool)
    assert {o["identity"] for o in out} == {"W38", "W41"}            # both in age group 40
    assert all(o["identity_gender"] == "Woman" and o["identity_mismatch"] is None for o in out)
    counts = collections.Counter(o["identity"] for o in out)
    assert max(counts.values()) - min(counts.values()) <= 1          # even spread
    # deterministic and independent of input order and of the pool's order
    shuffled = dias[:]
    random.Random(1).shuffle(shuffled)
    pool_shuffled = pool[::-1]
    again = {d["id"]: o["identity"] for d, o in zip(shuffled, identity.assign_identities(shuffled, pool_shuffled))}
    assert again == {d["id"]: o["identity"] for d, o in zip(dias, out)}
    assert out[0]["identity_record"]["img_path"] == f"Woman{out[0]['identity'][1:]}.jpg"
    # a different salt gives another (still valid) assignment
    other = identity.assign_identities(dias, pool, salt="x")
    assert [o["identity"] for o in other] != [o["identity"] for o in out]


def test_identity_age_groups_and_even_spread_over_groups():
    pool = _pool()
    dias = [{"id": f"d{i}", "gender": "male" if i % 2 else "female", "age": a}
            for i, a in enumerate([20, 25, 30, 60, 65, 70, 19, 42] * 5)]
    out = identity.assign_identities(dias, pool)
    for d, o in zip(dias, out):
        assert o["identity_gender"] == intake.normalize_gender(d["gender"])
        groups = {intake.age_group(p["age"]) for p in pool if p["gender"] == o["identity_gender"]}
        best = min(abs(g - intake.age_group(d["age"])) for g in groups)
        assert abs(o["identity_age_group"] - intake.age_group(d["age"])) == best
        assert (o["identity_mismatch"] is None) == (best == 0)
    # age 70 -> group 70: the pool's nearest is 60 (age 63), recorded
    o70 = out[5]
    assert o70["identity_age"] == 63.0 and o70["identity_mismatch"] == "no identity in age group 70 (nearest 60)"
    # 25 -> group 30, equally near 28 (group 30) exactly; 19 -> group 20 (22)
    assert out[1]["identity"] == "M28" and out[6]["identity"] == "W22"


def test_identity_small_pools_record_mismatch():
    only_men = [{"identity": 7, "gender": "Man", "age": 30.0}, {"identity": 8, "gender": "Man", "age": 70.0}]
    out = identity.assign_identities(_dialogues(5, "female", 32) + [{"id": "x", "gender": "non-binary", "age": None}],
                              only_men)
    assert [o["identity"] for o in out[:5]] == [7] * 5
    assert out[0]["identity_mismatch"] == "no Woman identity in the pool"
    assert out[5]["identity_mismatch"] == "client gender unknown; client age unknown"
    assert out[5]["identity"] in (7, 8)
    one = identity.assign_identities(_dialogues(3, "male", 80), [{"identity": "a", "gender": "Woman", "age": 20}])
    assert all(o["identity"] == "a" for o in one)
    assert one[0]["identity_mismatch"] == "no Man identity in the pool; no identity in age group 80 (nearest 20)"
    assert identity.assign_identities([], only_men) == []


def test_identity_empty_or_unusable_pool_raises():
    with pytest.raises(ValueError, match="no usable identity"):
        identity.assign_identities(_dialogues(2), [])
    with pytest.raises(ValueError, match="no usable identity"):
        identity.assign_identities(_dialogues(2), [{"identity": "a", "gender": "unknown", "age": 30},
                                             {"identity": "b", "gender": "Man", "age": None}])


# ----------------------------------------------------------------------------- dialogue filters

GOOD = """\
Therapist: [warm smile] Thanks for coming in today. What brings you here?
Client: [arms crossed] My sister made me come. I doubt talking will change anything.
Therapist: [nods slowly] That sounds frustrating. What happens when you think about work?
Client: [looks away] I keep thinking I will mess up the big presentation.
Therapist: [gentle] What evidence do you have for that thought?
Client: [shrugs] I froze once during a meeting last year.
Therapist: [curious] And what happened after that meeting?
Client: [sighs] Nothing much, my manager said it was fine.
"""
RECORD = {"client_persona": "Dana Kim is a 34-year-old female whose occupation is Analyst.",
          "personality": "The client keeps feelings at arm's length.",
          "reason_counseling": "I want to stop dreading every meeting at work.",
          "thought": "I will embarrass myself at the presentation.",
          "cbt_plan": "1. Evidence: We will list past meetings.\n2. Test: We will try one small talk."}


def _batch(dialogues, records=None):
    n = len(dialogues)
    records = records or [RECORD] * n
    batch = {R.ID: np.array([f"d{i}" for i in range(n)], dtype=object),
             "dialogue": np.array(dialogues, dtype=object)}
    procs = np.empty(n, dtype=object)
    for i, d in enumerate(dialogues):
        procs[i] = screenplay.parse_screenplay(d)[0]
    batch["proc_dialogue"] = procs
    for k in RECORD:
        batch[k] = np.array([r[k] for r in records], dtype=object)
    return batch


P = D.DialogueFilterParams()


def test_good_dialogue_passes_every_filter():
    res = D.run_filters(GOOD, screenplay.parse_screenplay(GOOD)[0], RECORD, P)
    assert [r.filter for r in res] == list(D.FILTERS)
    assert all(r.passed for r in res), [r.reason() for r in res]
    scores = {r.filter: r.score for r in res}
    assert scores["turn_count"] == 4 and scores["speakers"] == 2 and scores["copy_paste"] == 0
    assert scores["pos_repetition"] <= 3 and scores["word_repetition"] >= 0.5
    assert D.failure_reason(res) is None


def test_turn_count_filter():
    short = "\n".join(GOOD.splitlines()[:6])                           # 3 turns
    long = GOOD * 6                                                     # 24 turns
    assert not D.check_turn_count(short, P).passed and D.check_turn_count(short, P).score == 3
    assert not D.check_turn_count(long, P).passed
    assert D.check_turn_count(GOOD * 5, P).passed                       # 20 turns: edge kept
    # raw lines count, parsed or not (MIRROR semantics)
    assert D.check_turn_count(GOOD.replace("Therapist:", "The therapist says"), P).score == 4


def test_speakers_filter():
    three = GOOD + "Narrator: [quiet] The room goes silent for a moment.\n"
    r = D.check_speakers(three, P)
    assert not r.passed and r.score == 3 and "Narrator" in r.reason()
    assert D.check_speakers(GOOD, P).passed


def test_word_repetition_filter():
    rep = GOOD.replace("I froze once during a meeting last year.", "no no no no no no yes yes")
    r = D.check_word_repetition(rep, P)
    assert not r.passed and r.where == [5] and r.score < 0.5
    assert "line 5" in r.reason()


def test_response_failure_filter():
    for said in ("", "I don't know", "Hmmmm", "uhh", "I DON'T KNOW"):
        text = GOOD.replace("[gentle] What evidence do you have for that thought?", said)
        r = D.check_response_failure(text, P)
        assert not r.passed and r.where == [4], said
    # a client saying it is fine; a therapist line with a stage direction only fails when asked
    assert D.check_response_failure(GOOD.replace("Nothing much, my manager said it was fine.", "I don't know"), P).passed
    directed = GOOD.replace("What evidence do you have for that thought?", "hmm")
    assert D.check_response_failure(directed, P).passed
    assert not D.check_response_failure(directed, P.model_copy(update={"failure_ignore_stage_direction": True})).passed


def test_pos_repetition_filter():
    bad = GOOD.replace("I froze once during a meeting last year.", "I am really very truly deeply sorry.")
    r = D.check_pos_repetition(bad, P)
    assert not r.passed and r.where == [5] and r.score == 4
    assert [t for _, t in D.pos_tag("really very truly deeply")] == ["RB"] * 4
    # brackets and quotes reset the run
    assert D._longest_run([("a", "NN"), ("b", "NN"), ("[", "NN"), ("c", "NN"), ("d", "NN")]) == 2
    assert D.check_pos_repetition(bad, P.model_copy(update={"max_pos_run": 4})).passed


def test_copy_paste_filter_and_splitters():
    copied = GOOD.replace("I froze once during a meeting last year.",
                          "Honestly, I want to stop dreading every meeting at work. That is all.")
    turns = screenplay.parse_screenplay(copied)[0]
    r = D.check_copy_paste(turns, D.copy_sources(RECORD, P.copy_fields), P)
    assert not r.passed and r.where == [5] and r.unit == "turn" and r.score == 1
    # plan items ("1. ...") are exempt, the sentence after them is not
    plan_item = GOOD.replace("I froze once during a meeting last year.", "1. Evidence: We will list past meetings.")
    assert D.check_copy_paste(screenplay.parse_screenplay(plan_item)[0], [RECORD["cbt_plan"]], P).passed
    assert D.check_copy_paste([], [RECORD["cbt_plan"]], P).passed and D.copy_sources({"x": None}, ["x", "y"]) == []
    # pysbd keeps "Dr. Lee" in one sentence; MIRROR's regex splits after "Dr."
    src = "I saw Dr. Lee twice. It did not help."
    assert D.split_sentences(src) == ["I saw Dr. Lee twice.", "It did not help."]
    assert D.split_sentences(src, "mirror_regex") == ["I saw Dr.", "Lee twice.", "It did not help."]
    says = [{"speaker": "Client", "stage_direction": "", "statement": "Well, I saw Dr. Smith once."}]
    assert D.check_copy_paste(says, [src], P).passed
    assert not D.check_copy_paste(says, [src], P.model_copy(update={"sentence_splitter": "mirror_regex"})).passed
    with pytest.raises(ValueError):
        D.split_sentences("x", "punkt")


def test_dialogue_filters_stage_names_every_failure():
    bad = (GOOD.replace("I froze once during a meeting last year.", "I am really very truly deeply sorry.")
           .replace("Nothing much, my manager said it was fine.", "I want to stop dreading every meeting at work."))
    out = D.dialogue_filters(_batch([GOOD, bad]), P)
    assert out[R.ROW_REJECT][0] is None
    reason = out[R.ROW_REJECT][1]
    assert reason.startswith("dialogue filters failed: ")
    assert "pos_repetition (line 5;" in reason and "copy_paste (turn 7;" in reason
    assert out["score_pos_repetition"] == [out["score_pos_repetition"][0], 4] and out["score_copy_paste"] == [0, 1]
    assert [f["filter"] for f in json.loads(out["dialogue_filter_failures"][1])] == ["pos_repetition", "copy_paste"]
    assert all(len(v) == 2 for v in out.values())
    single = D.dialogue_filters(_batch([GOOD, GOOD.replace("last year.", "a a a a a a a a a")]),
                                P.model_copy(update={"filters": ["word_repetition"]}))
    assert single["score_turn_count"] == [None, None]
    assert single[R.ROW_REJECT][0] is None and "word_repetition (line 5" in single[R.ROW_REJECT][1]
    only = D.dialogue_filters(_batch([GOOD * 6]), P.model_copy(update={"filters": ["speakers"]}))
    assert only[R.ROW_REJECT] == [None] and only["score_turn_count"] == [None]


def test_dialogue_filter_params_validate():
    with pytest.raises(ValueError):
        D.DialogueFilterParams(filters=["nope"])
    with pytest.raises(ValueError):
        D.DialogueFilterParams(unknown=1)


# ----------------------------------------------------------------------------- group by dialogue

def test_group_drop_logic():
    ids = ["a", "a", "a", "b", "b", "c"]
    turns = [1, 3, 5, 1, 3, 1]
    failed = {"clip": [False, True, True, False, False, False],
              "nsfw": [False, False, True, False, True, False]}
    reasons = {"clip": [None, "similarity 0.12 < 0.2", "similarity 0.05 < 0.2", None, None, None],
               "nsfw": [None, None, "nsfw 0.9 >= normal 0.1", None, "", None]}
    grouped = D.group_dialogue_verdicts(ids, turns, failed, reasons)
    assert list(grouped) == ["a", "b", "c"]
    assert grouped["a"]["dropped"] and grouped["a"]["failures"] == {"clip": [3, 5], "nsfw": [5]}
    assert grouped["a"]["reason"] == "clip (turns 3, 5: similarity 0.12 < 0.2); nsfw (turn 5: nsfw 0.9 >= normal 0.1)"
    # a failed row with an empty reason still drops its dialogue (issue 18 item 1)
    assert grouped["b"] == {"dropped": True, "failures": {"nsfw": [3]}, "reason": "nsfw (turn 3: no reason recorded)"}
    assert grouped["c"] == {"dropped": False, "failures": {}, "reason": None}
    with pytest.raises(ValueError, match="same length"):
        D.group_dialogue_verdicts(ids, turns[:-1], failed)
    with pytest.raises(TypeError, match="not its reason text"):  # a reason where a status belongs
        D.group_dialogue_verdicts(ids, turns, reasons)


def test_dialogue_filters_through_runtime_apply_stage():
    """The stage function on an Arrow block as the runtime hands it over (struct lists, None
    stage directions), rejecting only the failing dialogue."""
    import functools

    import pyarrow as pa

    from jobs.core.runtime import StageRun, apply_stage

    bad = GOOD.replace("I froze once during a meeting last year.", "no no no no no no yes yes")
    unbracketed = GOOD.replace("Therapist: [curious] ", "Therapist: ")
    batch = _batch([GOOD, bad, unbracketed])
    n = 3
    table = pa.table({**{k: pa.array(list(v)) for k, v in batch.items()},
                      R.STATUS: [R.OK] * n, R.STAGE: [None] * n, R.REASON: [None] * n,
                      R.PLACEHOLDER: [""] * n, R.AUDIT: [""] * n})
    outputs = (*D.SCORE_COLUMNS.values(), "dialogue_filter_failures")
    run = StageRun(name="dialogue_filters", outputs=outputs, filter=True)
    out = apply_stage(table, functools.partial(D.dialogue_filters, params=P, audit=False), run)
    assert out.column(R.STATUS).to_pylist() == [R.OK, R.REJECTED, R.OK]
    assert out.column(R.REASON).to_pylist()[1].startswith("dialogue filters failed: word_repetition (line 5")
    assert out.column("score_turn_count").to_pylist() == [4.0, 4.0, 4.0]


def test_face_pool_from_labels_and_celeba_csv(tmp_path):
    recs, rejects, left = identity.read_face_pool(str(REPO / "data" / "faces"))
    assert [r["identity"] for r in recs] == ["eileen_collins", "joe_biden", "barack_obama", "barack_obama",
                                            "barack_obama"] and not rejects and left == 0
    assert recs[0]["image"].endswith("data/faces/astronaut.png") and recs[0]["img_path"] == "astronaut.png"
    dedup, _, left = identity.read_face_pool(str(REPO / "data" / "faces"), drop_duplicated=True)
    assert [r["img_path"] for r in dedup] == ["astronaut.png", "biden.jpg", "obama.jpg"] and left == 2
    (tmp_path / "img_align_celeba").mkdir()
    csv = tmp_path / "celeba.csv"
    csv.write_text("image,identity,Male,Young\n000002.jpg,7,-1,1\n000001.jpg,7,-1,1\n000003.jpg,,1,1\n")
    recs, rejects, _ = identity.read_face_pool(str(csv))
    assert [r["img_path"] for r in recs] == ["000001.jpg", "000002.jpg"]
    assert recs[0]["image"] == str(tmp_path / "img_align_celeba" / "000001.jpg") and recs[0]["celeb_male"] == -1
    assert len(rejects) == 1 and "line 4: empty identity" in rejects[0]["reason"]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,who\nx.jpg,1\n")
    with pytest.raises(ValueError, match="needs columns file"):
        identity.read_face_pool(str(bad))
