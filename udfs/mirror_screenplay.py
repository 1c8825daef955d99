"""MIRROR screenplays (SPEC A2-A3): the four resistance traits, the screenplay prompt and sampling,
screenplay rows per client and trait, the line parser, and the line grammar/regex that constrains
small models (pure functions; no Ray, no model).

Sources: see ``udfs.mirror_intake`` (MIRROR, MIRROR-LLaVA, CBT-Bench, Cactus). Every prompt is
written in our own words from SPEC's descriptions; nothing is copied from the reference repository.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Literal

from udfs import rows as R


#: MIRROR's four resistance traits (names and slugs: ``mirror/agent/personality.py``; the
#: behavioural descriptions are our own 4-sentence summaries of SPEC A2's paraphrase).
RESISTANCE_TRAITS: dict[str, dict[str, str]] = {
    "emotional-resistance": {
        "name": "Emotional Resistance",
        "description": (
            "The client keeps feelings at arm's length and changes the subject when emotions come up. "
            "They answer questions about how they feel with facts or jokes. "
            "Naming a painful feeling makes them tense or defensive. "
            "They may admit a feeling only briefly before pulling back."),
    },
    "cognitive-resistance": {
        "name": "Cognitive Resistance",
        "description": (
            "The client holds firmly to a negative view of themselves. "
            "They argue with the therapist's suggestions and alternative explanations. "
            "They treat their own thoughts as facts and dismiss evidence against them. "
            "Reframes are often met with \"yes, but\"."),
    },
    "behavioral-resistance": {
        "name": "Behavioral Resistance",
        "description": (
            "The client is doubtful that therapy can help. "
            "They have skipped sessions or left homework undone before. "
            "They agree vaguely to tasks without committing to them. "
            "They look for reasons why a plan will not work in practice."),
    },
    "no-resistance": {
        "name": "No Resistance",
        "description": (
            "The client is open to the process and wants to change. "
            "They share thoughts and feelings readily. "
            "They try out new perspectives and ask questions when unsure. "
            "They commit to small next steps."),
    },
}

#: Sampling of MIRROR step 2 (``mirror/agent/counseling_gen.py``, ``mirror/utils/openai_utils.py``;
#: SPEC A2), direct and batch mode alike.
SCREENPLAY_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 1024,
                       "frequency_penalty": 0.2, "presence_penalty": 0.2}

SCREENPLAY_SYSTEM = """\
You write the script of a client's first session of cognitive behavioural therapy that \
focuses on cognitive reframing, based on the client report you are given.

Format: output only dialogue lines, one utterance per line, each written as
Therapist: [stage direction] what the therapist says
Client: [stage direction] what the client says
The therapist speaks first and the two speakers alternate. The stage direction in square \
brackets is a few words on the speaker's visible emotion or body language. Keep every \
utterance to one or two sentences. Write between 8 and 40 lines.

The client: act out the personality trait in the report consistently, in words and in the \
stage directions. If the resistance grows, the session may end early.

The therapist: follow the CBT plan one step at a time, starting from the distorted thought.
- When the client disagrees outright, do not argue: acknowledge the view and ask what \
would make it feel less true.
- When the client agrees only half-heartedly ("I guess so"), check what part still does \
not fit.
- When the client shows distress, slow down, name the feeling and offer a pause.
- When the client avoids a topic, goes quiet or disengages in small ways (short answers, \
looking away), reflect it gently and ask permission before going on.
- To close: name any impasse honestly, validate the effort, and point out small gains.
- Homework for a resistant client is chosen together, very small, and framed as an \
experiment rather than a test."""

_FEW_SHOT_USER_1 = """\
Client Information
Personal Information: Sam Ortiz is a 29-year-old male whose occupation is barista. Marital status: Single.
Personality Traits: Cognitive Resistance: The client holds firmly to a negative view of themselves. They argue with suggestions and dismiss evidence against their thoughts.
Distorted Thoughts: If I make one mistake at work, I will be fired.
Thinking Trap: fortune-telling, magnification
Reason for Seeking Counseling: I cannot sleep before my shifts because I keep replaying everything that could go wrong.

CBT Plan
1. Evidence review: We will list what has actually happened after past mistakes at work.
2. Alternative explanations: We will look for other ways a manager might react to one error.
3. Small test: We will plan one low-risk check of the prediction this week.

Keep every response to at most two lines.

First Session Counseling"""

_FEW_SHOT_ASSISTANT_1 = """\
Therapist: [leans forward, friendly] Thanks for coming in, Sam. What has been on your mind before your shifts?
Client: [arms crossed] That one mistake and I am out. That is just how it works.
Therapist: [calm, curious] It sounds very certain to you. Have you made a mistake at work before?
Client: [shrugs] Sure, I mixed up an order last month. I still think I got lucky.
Therapist: [nods slowly] What happened after that order got mixed up?
Client: [looks away] My manager told me to remake it. Nothing else, but next time will be different.
Therapist: [gentle] So one piece of evidence says a mistake led to a remake, not a firing.
Client: [sighs, unconvinced] Yes, but that does not mean anything.
Therapist: [patient] Fair enough. Would you be willing to note what happens after small slips this week, just as an experiment?
Client: [hesitant half smile] I guess I could write a few things down."""

_FEW_SHOT_USER_2 = """\
Client Information
Personal Information: Mei Lin is a 41-year-old female whose occupation is nurse. Family: Two teenage children.
Personality Traits: Behavioral Resistance: The client is doubtful that therapy can help. They agree vaguely to tasks without committing to them.
Distorted Thoughts: I am a bad mother because I work night shifts.
Thinking Trap: labeling, should statements
Reason for Seeking Counseling: My sister said I seem exhausted and guilty all the time.

CBT Plan
1. Rule spotting: We will find the rules behind the word "bad".
2. Continuum: We will place good and bad parenting on a scale with concrete examples.
3. Rules to wishes: We will turn one rigid rule into a preference.

Keep every response to at most two lines.

First Session Counseling"""

_FEW_SHOT_ASSISTANT_2 = """\
Therapist: [warm smile] Hello Mei, I am glad you made it. What would you like to focus on today?
Client: [glances at the clock] My sister made me come. I doubt talking changes my schedule.
Therapist: [nods] That is honest, thank you. What goes through your mind after a night shift?
Client: [tired voice] That a good mother would be home. So I am a bad one.
Therapist: [thoughtful] What would a good mother do, in your view?
Client: [frowns] Be there for breakfast, help with homework, not sleep all afternoon.
Therapist: [gently] Which of those things do you manage in a usual week?
Client: [pauses, softer] Homework on my days off. Breakfast twice, maybe.
Therapist: [encouraging] Could we try one small thing: note each time you do something for your kids this week?
Client: [noncommittal] Maybe. If I remember."""

#: Two invented few-shot pairs (user = client block, assistant = screenplay), our own words;
#: MIRROR uses two such pairs (``mirror/agent/examples/prompt_N.txt``/``output_N.txt``, SPEC A2).
SCREENPLAY_FEW_SHOT: tuple[tuple[str, str], ...] = (
    (_FEW_SHOT_USER_1, _FEW_SHOT_ASSISTANT_1),
    (_FEW_SHOT_USER_2, _FEW_SHOT_ASSISTANT_2),
)

_LENGTH_RULE = "Keep every response to at most two lines."


def default_screenplay_prompt() -> dict[str, Any]:
    """The screenplay prompt as JSON-serialisable data a recipe can hold:
    ``{"system": str, "few_shot": [[user, assistant], [user, assistant]], "length_rule": str}``."""
    return {"system": SCREENPLAY_SYSTEM, "few_shot": [list(p) for p in SCREENPLAY_FEW_SHOT],
            "length_rule": _LENGTH_RULE}


def client_block(record: dict[str, Any], trait: str, length_rule: str = _LENGTH_RULE) -> str:
    """The user query of the screenplay prompt (SPEC A2 layout: a "Client Information" block
    with personal information, personality trait, distorted thought, thinking trap and reason,
    then the numbered CBT plan, the length rule and a "First Session Counseling" header).

    ``record``: a client record after completion; ``trait``: a ``RESISTANCE_TRAITS`` slug.
    Raises ``KeyError`` for an unknown trait."""
    t = RESISTANCE_TRAITS[trait]
    traps = ", ".join(record.get("patterns") or []) or "(none given)"
    return (f"Client Information\n"
            f"Personal Information: {record.get('client_persona', '')}\n"
            f"Personality Traits: {t['name']}: {t['description']}\n"
            f"Distorted Thoughts: {record.get('thought') or '(none given)'}\n"
            f"Thinking Trap: {traps}\n"
            f"Reason for Seeking Counseling: {record.get('reason_counseling', '')}\n\n"
            f"CBT Plan\n{record.get('cbt_plan') or ''}\n\n"
            f"{length_rule}\n\nFirst Session Counseling")


def screenplay_messages(record: dict[str, Any], trait: str, prompt: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Chat messages for one screenplay: system, the few-shot pairs, then ``client_block``.
    ``prompt``: the recipe's prompt data (``default_screenplay_prompt()`` shape); default ours."""
    p = prompt or default_screenplay_prompt()
    msgs = [{"role": "system", "content": p["system"]}]
    for user, assistant in p.get("few_shot") or []:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    msgs.append({"role": "user", "content": client_block(record, trait, p.get("length_rule", _LENGTH_RULE))})
    return msgs


def screenplay_id(row_index: int, trait: str) -> str:
    """``cactus-{row}-{trait}`` (MIRROR ``run_step2.py``, e.g. ``cactus-7658-emotional-resistance``).
    Raises ``KeyError`` for an unknown trait slug."""
    if trait not in RESISTANCE_TRAITS:
        raise KeyError(f"unknown resistance trait {trait!r}; known: {sorted(RESISTANCE_TRAITS)}")
    return f"cactus-{int(row_index)}-{trait}"


def screenplay_rows(record: dict[str, Any], traits: Iterable[str] = tuple(RESISTANCE_TRAITS)) -> list[dict[str, Any]]:
    """Cross a client record with the resistance traits: one row per trait with ``id``
    (``screenplay_id``), ``resistance`` (trait name; MIRROR's column wrongly kept the row
    number, SPEC A2), ``resistance_slug`` and ``personality`` (description), plus every field
    of the record."""
    return [{**record, R.ID: screenplay_id(record["row_index"], t), "resistance": RESISTANCE_TRAITS[t]["name"],
             "resistance_slug": t, "personality": RESISTANCE_TRAITS[t]["description"]} for t in traits]


#: MIRROR's line pattern (``mirror/step2/postprocess.py``, SPEC A2).
LINE_RE = re.compile(r"^(Therapist|Client):\s*\[(.*?)\]\s*(.*)")


def parse_line(line: str, client_name: str | None = None) -> dict[str, Any] | None:
    """Parse one screenplay line into ``{"speaker", "stage_direction", "statement"}``.

    Order (MIRROR ``postprocess.py``, SPEC A2 / notes section 6): (1) ``LINE_RE``;
    (2) the same with the client's name (full or first name) as speaker; (3) no bracket,
    ``Speaker: text`` -> ``stage_direction`` None. A line spoken under the client's name is
    given speaker ``Client`` (ours: downstream stages look for client turns). Returns ``None``
    for a line none of these match (empty lines, narration, ``The client: ...``)."""
    s = line.strip()
    if not s:
        return None
    m = LINE_RE.match(s)
    if m:
        return {"speaker": m.group(1), "stage_direction": m.group(2).strip(), "statement": m.group(3).strip()}
    names = []
    if client_name and client_name.strip():
        full = client_name.strip()
        names = [re.escape(full)] + ([re.escape(full.split()[0])] if " " in full else [])
        m = re.match(rf"^(?:{'|'.join(names)}):\s*\[(.*?)\]\s*(.*)", s)
        if m:
            return {"speaker": "Client", "stage_direction": m.group(1).strip(), "statement": m.group(2).strip()}
    m = re.match(rf"^(Therapist|Client{''.join('|' + n for n in names)}):\s*(.*)", s)
    if m:
        speaker = m.group(1) if m.group(1) in ("Therapist", "Client") else "Client"
        return {"speaker": speaker, "stage_direction": None, "statement": m.group(2).strip()}
    return None


def parse_screenplay(text: Any, client_name: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse a generated screenplay: ``(turns, unparsed non-empty lines)``. ``turns`` is
    MIRROR's ``proc_dialogue``; ``len(turns) / 2`` is its ``turn`` column (SPEC A2)."""
    turns, bad = [], []
    for line in str(text or "").splitlines():
        if not line.strip():
            continue
        t = parse_line(line, client_name)
        (turns.append(t) if t else bad.append(line.strip()))
    return turns, bad


# Stage directions: a letter then letters, spaces and light punctuation, no brackets, braces
# or parentheses (notes 3.4: a looser class let SmolLM2 write "[nods) Yes, ...]").
_DIR_CHARS = "A-Za-z ,.'-"


def screenplay_grammar(min_pairs: int = 4, max_pairs: int = 20, max_direction: int = 40,
                       max_statement: int = 200) -> str:
    """xgrammar EBNF for a screenplay of ``min_pairs``..``max_pairs`` Therapist/Client line
    pairs, each ``Speaker: [direction] statement\\n``.

    Default bounds follow MIRROR's turn-count filter (4 <= lines/2 <= 20, SPEC A8) so a
    grammar-complete reply always passes it; ``max_direction``/``max_statement`` (characters)
    keep a small model from rambling (notes 3.4: SmolLM2 free-sampled lines parse 49 % of the
    time, under this kind of grammar 100 %). Statements contain no newline or square bracket.
    Raises ``ValueError`` for inconsistent bounds."""
    _check_bounds(min_pairs, max_pairs, max_direction, max_statement)
    return (f"root ::= pair{{{min_pairs},{max_pairs}}}\n"
            'pair ::= "Therapist: [" dir "] " stmt "\\n" "Client: [" dir "] " stmt "\\n"\n'
            f"dir ::= [A-Za-z] [{_DIR_CHARS}]{{0,{max_direction - 1}}}\n"
            f"stmt ::= [^\\n\\[\\] ] [^\\n\\[\\]]{{0,{max_statement - 1}}}\n")


def screenplay_regex(min_pairs: int = 4, max_pairs: int = 20, max_direction: int = 40,
                     max_statement: int = 200) -> str:
    """The same language as ``screenplay_grammar`` as a regular expression (for the LLM stage's
    ``regex`` output format: xgrammar/vLLM guided decoding and Python ``re.fullmatch``
    validation). The final newline is optional. Raises ``ValueError`` for inconsistent bounds."""
    _check_bounds(min_pairs, max_pairs, max_direction, max_statement)
    d = f"[A-Za-z][{_DIR_CHARS}]{{0,{max_direction - 1}}}"
    s = f"[^\\n\\[\\] ][^\\n\\[\\]]{{0,{max_statement - 1}}}"
    pair = f"Therapist: \\[{d}\\] {s}\\nClient: \\[{d}\\] {s}"
    head = f"(?:{pair}\\n){{{min_pairs - 1},{max_pairs - 1}}}" if max_pairs > 1 else ""
    return f"{head}{pair}\\n?"


def _check_bounds(min_pairs: int, max_pairs: int, max_direction: int, max_statement: int) -> None:
    if not 1 <= min_pairs <= max_pairs:
        raise ValueError(f"need 1 <= min_pairs <= max_pairs, got {min_pairs}, {max_pairs}")
    if max_direction < 1 or max_statement < 1:
        raise ValueError("max_direction and max_statement must be >= 1")


_GRAMMAR_CACHE: dict[tuple[str, str], Any] = {}


def grammar_accepts(grammar: str, text: str, kind: Literal["ebnf", "regex"] = "ebnf") -> bool:
    """True when xgrammar accepts ``text`` as a complete string of ``grammar`` (EBNF or regex).

    Compiles against a character-level vocabulary (printable ASCII, newline, stop token), so
    it needs no model tokenizer; compiled grammars are cached per (kind, grammar). Text with
    characters outside printable ASCII is rejected. Raises ``RuntimeError`` (xgrammar's) when
    the grammar does not compile."""
    import xgrammar as xgr

    vocab = [chr(i) for i in range(32, 127)] + ["\n", "<|stop|>"]
    stop = len(vocab) - 1
    key = (kind, grammar)
    if key not in _GRAMMAR_CACHE:
        compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, stop_token_ids=[stop]))
        _GRAMMAR_CACHE[key] = (compiler.compile_regex(grammar) if kind == "regex"
                               else compiler.compile_grammar(grammar))
    if any(not (32 <= ord(c) < 127 or c == "\n") for c in text):
        return False
    matcher = xgr.GrammarMatcher(_GRAMMAR_CACHE[key])
    return bool(matcher.accept_string(text) and matcher.accept_token(stop) and matcher.is_terminated())
