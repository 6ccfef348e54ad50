"""TextWorld's text -> the abstract state M_exp reads and writes (paper §4.5, "abstract state").

Abstract state (paper §4.5): TextWorld room descriptions are written by a grammar full of jokes
("You shudder, but continue examining the stove."), so the parser is anchored on the game's own
lexicon (entity names and kinds, static per game, read from the cached game file) and keeps only
what the text says: which containers and supporters are here, open/closed/locked, what they hold
(with the cooking adjectives the game prints, "sliced carrot"), the exits with their doors, the
things on the floor and the inventory. The intro paragraph of each room is decoration and is
dropped. The text cannot tell locked from closed (doors always read "closed"), and an open
container always lists its contents or says it is empty, so a container the text leaves silent
is closed. tests/test_textworld_env.py checks the parse against the engine's own facts.

Where this departs from the paper, and why: the paper's abstract states are written by an LLM
prompt; here they are parsed by rules, because the game's lexicon makes a deterministic parse
possible and a parse that can be checked against the engine's facts cannot hallucinate. The
adapter itself (games, splits, the engine) is ``textworld_env``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dreamgym_core.state import AbstractState, clean_text

DIRECTIONS = ("north", "south", "east", "west")


@dataclass(frozen=True)
class Lexicon:
    """The game's named entities: kind ("container" | "supporter" | "door" | "thing") and noun."""

    kinds: dict[str, str]
    nouns: dict[str, str]

    @classmethod
    def from_game(cls, game) -> "Lexicon":
        types = game.kb.types
        kinds, nouns = {}, {}
        for info in game.infos.values():
            if not info.name or info.type in ("r", "P", "I"):
                continue
            if types.is_descendant_of(info.type, "c"):
                kind = "container"
            elif types.is_descendant_of(info.type, "s"):
                kind = "supporter"
            elif types.is_descendant_of(info.type, "d"):
                kind = "door"
            else:
                kind = "thing"
            kinds[info.name] = kind
            if info.noun and info.noun != info.name:
                nouns[info.name] = info.noun
        return cls(kinds, nouns)


_HEADER = re.compile(r"^\s*-=\s*(.+?)\s*=-\s*$", re.M)
_PARAGRAPHS = re.compile(r"\n\s*\n")
_STATE_WORD = re.compile(r"\b(locked|closed|opened|open)\b", re.I)
_DIRECTION = re.compile(rf"\b({'|'.join(DIRECTIONS)})\b", re.I)
_SENTENCE_END = re.compile(r"[.!?]")
_ARTICLES = ("a", "an", "some", "the")
_FLOOR = re.compile(r"^There is (.+) on the floor\.$", re.S)
_CARRYING = re.compile(r"You are carrying:?\s*(.*?)\.?\s*$", re.S)
# Grammar jokes that put an article before a word some games use as an entity name ("note", "door").
_FILLER_PHRASES = re.compile(r"\b(?:a mental note|a note of this|an exit without a door|the post office|"
                             r"the name TextWorld|the worst thing)\b", re.I)


class _Matcher:
    """Finds entity mentions (full names, and holder nouns when unambiguous), longest first."""

    def __init__(self, lexicon: Lexicon, visible: set[str] | None = None):
        kinds = lexicon.kinds
        aliases: dict[str, str] = {n.lower(): n for n in kinds}
        nouns: dict[str, list[str]] = {}
        for name, kind in kinds.items():
            noun = lexicon.nouns.get(name)
            if noun and kind in ("container", "supporter") and (visible is None or name in visible):
                nouns.setdefault(noun.lower(), []).append(name)
        for noun, names in nouns.items():
            if len(names) == 1 and noun not in aliases:
                aliases[noun] = names[0]
        self.kinds = kinds
        self.aliases = aliases
        alts = "|".join(re.escape(a) for a in sorted(aliases, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<![\w-])(?:{alts})(?![\w-])", re.I) if alts else None

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Mentions as (start, end, name); only those introduced by an article count.

        The game always writes entities with an article ("a closed chest", "some milk", "the
        sliced carrot"), while jokes may use the same word bare ("When you stand up, ...").
        """
        if self.pattern is None:
            return []
        return [(m.start(), m.end(), self.aliases[m.group(0).lower()]) for m in self.pattern.finditer(text)
                if _article_before(text, m.start()) is not None]


def _article_before(text: str, start: int, max_words: int = 4) -> int | None:
    """How many adjective words separate the article from position ``start`` (None: no article)."""
    words = text[:start].split()[-(max_words + 1):]
    for k, word in enumerate(reversed(words)):
        if word.lower() in _ARTICLES:
            return k
        if not re.fullmatch(r"[a-z-]+", word):
            return None
    return None


def _printed_name(text: str, start: int, name: str) -> str:
    """The name with the adjectives the game prints before it: "a sliced raw carrot" -> "sliced raw carrot"."""
    k = _article_before(text, start) or 0
    return " ".join([*text[:start].split()[len(text[:start].split()) - k:], name])


def _split_list(text: str) -> list[str]:
    """'a key, an apple and some milk' -> ['key', 'apple', 'milk'] (no lexicon available)."""
    out = []
    for part in re.split(r",\s*(?:and\s+)?|\s+and\s+", text.strip()):
        part = re.sub(rf"^(?:{'|'.join(_ARTICLES)})\s+", "", part.strip(), flags=re.I)
        if part:
            out.append(part)
    return out


def _holder_facts(text: str, matcher: _Matcher) -> list[str]:
    """Containers/supporters paragraph -> facts: each holder, its state and what it holds."""
    events = [(s, e, "name", n) for s, e, n in matcher.find(text)]
    events += [(m.start(), m.end(), "state", m.group(1).lower()) for m in _STATE_WORD.finditer(text)]
    events.sort()
    order: list[str] = []
    state: dict[str, str] = {}
    contents: dict[str, list[str]] = {}
    emptied: set[str] = set()
    loose: list[str] = []
    current: str | None = None
    for i, (start, end, what, value) in enumerate(events):
        if what == "state":
            # "a closed chest" binds forward to the next name; "The chest is locked." to the current one.
            nxt = next((ev for ev in events[i + 1:] if ev[2] == "name"), None)
            target = current
            if nxt and matcher.kinds[nxt[3]] == "container":
                gap = text[end:nxt[0]]
                if len(gap.split()) <= 4 and not _SENTENCE_END.search(gap):
                    target = nxt[3]
            if target and matcher.kinds.get(target) == "container":
                state[target] = "open" if value in ("open", "opened") else value
            continue
        kind = matcher.kinds[value]
        if kind in ("container", "supporter"):
            if value not in order:
                order.append(value)
                contents[value] = []
            current = value
        elif kind == "thing":
            item = _printed_name(text, start, value)
            (contents[current] if current else loose).append(item)
    # An open container always lists its contents or says it is empty; silence means closed.
    for m in re.finditer(r"\bempty\b", text, re.I):
        if owner := _owner_at(events, m.start(), matcher):
            emptied.add(owner)
    facts = []
    for name in order:
        items = ", ".join(sorted(contents[name])) or "empty"
        if matcher.kinds[name] == "supporter":
            facts.append(f"{name}: {items}")
            continue
        st = state.get(name) or ("open" if contents[name] or name in emptied else "closed")
        facts.append(f"{name} ({st}): {items}" if st == "open" else f"{name} ({st})")
    return facts + loose


def _owner_at(events, pos: int, matcher: _Matcher) -> str | None:
    """The holder whose description covers text position ``pos`` (the last one named before it)."""
    owner = None
    for start, _, what, value in events:
        if start > pos:
            break
        if what == "name" and matcher.kinds[value] in ("container", "supporter"):
            owner = value
    return owner


def _exit_facts(text: str, matcher: _Matcher) -> list[str]:
    facts = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        doors = [n for _, _, n in matcher.find(sentence) if matcher.kinds[n] == "door"]
        dirs = [d.lower() for d in _DIRECTION.findall(sentence)]
        if doors and dirs:
            st = _STATE_WORD.search(sentence)
            word = st.group(1).lower() if st else "closed"
            facts.append(f"{dirs[0]}: {doors[0]} ({'open' if word in ('open', 'opened') else word})")
        else:
            facts.extend(dirs)
    return facts


def _list_items(text: str, matcher: _Matcher) -> list[str]:
    found = matcher.find(text)
    if not found:
        return _split_list(text)
    return [_printed_name(text, s, n) for s, _, n in found]


def parse_description(description: str, lexicon: Lexicon, visible: set[str] | None = None
                      ) -> tuple[str, list[str], list[str]]:
    """A TextWorld room description -> (location, object facts, exit facts).

    ``visible`` (names the agent can currently examine) narrows the lexicon so that a noun shared
    by two holders elsewhere in the game does not become ambiguous here.
    """
    text = (description or "").strip()
    m = _HEADER.search(text)
    if not m:
        return "", [clean_text(text)] if text else [], []
    location = m.group(1).lower()
    matcher = _Matcher(lexicon, visible)
    body = _FILLER_PHRASES.sub("", text[m.end():].strip())
    paragraphs = [p.strip() for p in _PARAGRAPHS.split(body) if p.strip()]
    objects, exits = [], []
    for p in paragraphs[1:]:  # paragraphs[0] is the room's decorative intro
        if floor := _FLOOR.match(p):
            objects += _list_items(floor.group(1), matcher)
        elif any(matcher.kinds[n] in ("container", "supporter") for _, _, n in matcher.find(p)):
            objects += _holder_facts(p, matcher)
        else:
            exits += _exit_facts(p, matcher)
    return location, objects, exits


def parse_inventory(inventory: str, lexicon: Lexicon | None = None) -> list[str]:
    m = _CARRYING.search((inventory or "").strip())
    if not m or not m.group(1).strip() or m.group(1).strip().lower() == "nothing":
        return []
    if lexicon is None:
        return _split_list(m.group(1))
    return _list_items(m.group(1), _Matcher(lexicon))


_PROMPT_LINE = re.compile(r"\n?>[^\n]*$")  # the z-machine prompt and status bar ("> -= Room =-3/12")
_BANNER = re.compile(r"^[ $|\\/_]{20,}$", re.M)  # the ASCII-art title printed when a game starts
_END_BOILERPLATE = re.compile(r"You scored \d+ out of a possible \d+, in \d+ turns?\.|"
                              r"Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command\?")


def canonical_feedback(feedback: str, description: str = "", location: str = "") -> str:
    """One line: the action's own response; a room description becomes "You are in the <room>.".

    The opening text (title art, then the objective, which is already the task's instruction)
    is dropped, so a reset reads "You are in the <room>." like any arrival.
    """
    text = _PROMPT_LINE.sub("", (feedback or "").rstrip())
    header = _HEADER.search(text)
    if header and _BANNER.search(text[:header.start()]):
        text = text[header.start():]
    text = clean_text(_END_BOILERPLATE.sub("", text))
    if text.startswith("You are carrying"):
        return "You check your inventory."
    desc = clean_text(description)
    if location and desc and desc in text:
        return clean_text(text.replace(desc, f"You are in the {location}."))
    if m := _HEADER.search(text):  # a description we were not given: keep only its room
        return clean_text(f"{text[:m.start()]} You are in the {m.group(1).lower()}.")
    return text


def abstract_state(feedback: str, description: str, inventory: str, lexicon: Lexicon,
                   visible: set[str] | None = None) -> str:
    location, objects, exits = parse_description(description, lexicon, visible)
    return AbstractState.make(canonical_feedback(feedback, description, location), location, objects, exits,
                              parse_inventory(inventory, lexicon)).render()
