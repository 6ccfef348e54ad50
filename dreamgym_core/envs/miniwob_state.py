"""MiniWoB++ pages -> the abstract state, and the actions on it (paper §4.5, "abstract state").

The paper's web environments give the agent a cleaned list of page elements, not raw HTML. This
module is that cleaning for MiniWoB++, as pure functions of a parsed page: ``page_elements`` walks
the DOM MiniWoB reports and keeps the elements an agent can act on or read (``Element``: ref, kind,
text, checked, value), ``abstract_state`` renders them as ``AbstractState`` facts, and the action
side (``propose_candidates``, ``parse_action``, ``invalid_action``, ``expert_plan``) works on the
state text alone, so a synthetic state from M_exp gets the same candidates as a real one. The
fact and action formats are described in ``miniwob_env``'s docstring; the browser and the episode
loop live there.

Where this departs from the paper, and why: the paper's cleaned web states come from the
benchmarks' own accessibility trees; MiniWoB has none, so containers (body, div, form, p) and
inline filler are dropped here by rule, a checkbox takes its label's text and a text field the
text of the label before it, and static text is cut to ``TEXT_CHARS`` characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dreamgym_core.state import AbstractState, clean_text

TASKS = ("click-button", "click-link", "enter-text", "focus-text", "click-checkboxes", "login-user")
"""The tasks with a scripted expert (``expert_plan``); ``miniwob_env`` plays any of them."""
CLICKABLE = ("button", "link", "checkbox", "radio", "textbox", "password")
FIELDS_KINDS = ("textbox", "password")
TEXT_CHARS = 40
_FACT = re.compile(r'^(\[(\d+)\] (\w+)(?: "([^"]*)")?)( \(checked\))?(?:: (.*))?$')
_CLICK = re.compile(r'^click (\[(\d+)\] .+)$')
_TYPE = re.compile(r'^type "([^"]*)" into (\[(\d+)\] .+)$')


def _quote(text: str) -> str:
    """Page text made safe inside a fact: no double quotes, and no ': ' (the fact/contents separator)."""
    return clean_text(text).replace('"', "'").replace(": ", " - ").rstrip(":").strip()


@dataclass(frozen=True)
class Element:
    """One page element as the agent sees it."""

    ref: int | None
    """MiniWoB's element ref (None for static text, which cannot be acted on)."""
    kind: str
    """button | link | checkbox | radio | textbox | password | text."""
    text: str = ""
    """Visible text, or the label of a checkbox / text field."""
    value: str | bool | None = None
    """A text field's content; a checkbox's or radio's checked flag."""
    dom_id: str = ""

    def head(self) -> str:
        """The element's name in facts and actions: ``[04] button "no"``."""
        if self.ref is None:
            return f'text "{_quote(self.text)[:TEXT_CHARS]}"'
        return f'[{self.ref:02d}] {self.kind}' + (f' "{_quote(self.text)}"' if self.text else "")

    def fact(self) -> str:
        if self.kind in FIELDS_KINDS:
            return f"{self.head()}: {_quote(str(self.value or '')) or 'empty'}"
        if self.kind in ("checkbox", "radio") and self.value:
            return f"{self.head()} (checked)"
        return self.head()


def _subtree_text(el) -> str:
    if el.text is not None:
        return el.text
    return " ".join(t for t in (_subtree_text(c) for c in el.children) if t)


def page_elements(root) -> list[Element]:
    """MiniWoB's DOM tree (``miniwob.dom.DOMElement``) -> the agent's elements, in document order."""
    out: list[Element] = []

    def walk(el, parent, prev) -> None:
        tag = el.tag
        if tag in ("input_checkbox", "input_radio"):
            label = ""
            if parent is not None and parent.tag == "label":
                label = " ".join(c.text for c in parent.children if c.tag == "t" and c.text)
            out.append(Element(el.ref, tag.removeprefix("input_"), label,
                               bool(el.value), el.id))
        elif tag.startswith("input_") or tag == "textarea":
            label = prev.text if prev is not None and prev.tag == "label" and prev.text else ""
            kind = "password" if tag == "input_password" else "textbox"
            out.append(Element(el.ref, kind, label, str(el.value or ""), el.id))
        elif tag == "button":
            out.append(Element(el.ref, "button", _subtree_text(el), None, el.id))
        elif tag == "a" or "alink" in str(el.classes).split():
            out.append(Element(el.ref, "link", _subtree_text(el), None, el.id))
        elif el.text is not None:  # a leaf: static text, unless it labels the next field or is inline filler
            nxt = _next_sibling(el, parent)
            labels_field = tag == "label" and nxt is not None and nxt.tag.startswith("input_")
            if el.text.strip() and tag != "t" and not labels_field:
                out.append(Element(None, "text", el.text))
        else:
            previous = None
            for child in el.children:
                walk(child, el, previous)
                previous = child

    walk(root, None, None)
    return out


def _next_sibling(el, parent):
    if parent is None:
        return None
    kids = list(parent.children)
    i = next((k for k, c in enumerate(kids) if c is el), -1)
    return kids[i + 1] if 0 <= i < len(kids) - 1 else None


def task_values(fields) -> tuple[str, ...]:
    """The values a task gives to type (its fields, less MiniWoB's 'button' hint), in order."""
    return tuple(dict.fromkeys(_quote(str(v)) for k, v in fields if k != "button" and _quote(str(v))))


def abstract_state(feedback: str, page: str, elements: list[Element], values: tuple[str, ...]) -> str:
    return AbstractState.make(feedback, page, [e.fact() for e in elements], (), values).render()


def parse_fact(fact: str) -> tuple[str, int, str, bool, str | None] | None:
    """``[07] textbox "Username": keneth`` -> (head, ref, kind, checked, contents); None for static text."""
    m = _FACT.match(fact)
    if not m:
        return None
    return m[1], int(m[2]), m[3], bool(m[5]), m[6]


def propose_candidates(state: str) -> list[str]:
    """Every click and type action the state affords (the env's own candidate rule, real or synthetic)."""
    try:
        s = AbstractState.parse(state)
    except ValueError:
        return []
    cands = []
    for fact in s.objects:
        parsed = parse_fact(fact)
        if parsed is None or parsed[2] not in CLICKABLE:
            continue
        head, _, kind, _, _ = parsed
        cands.append(f"click {head}")
        if kind in FIELDS_KINDS:
            cands += [f'type "{v}" into {head}' for v in s.inventory]
    return sorted(set(cands))


def parse_action(action: str) -> tuple[str, int, str | None] | None:
    """'click [04] ...' -> ('click', 4, None); 'type "v" into [07] ...' -> ('type', 7, 'v'); else None."""
    if m := _TYPE.match(action):
        return "type", int(m[3]), m[1]
    if m := _CLICK.match(action):
        return "click", int(m[2]), None
    return None


def invalid_action(state: str, candidates, rng) -> str | None:
    """An action the page does not afford (for offline data with rejections; ``collect``).

    One of: clicking static text, clicking an element id that is not on the page, typing into
    something that is not a text field, typing a value the task did not give. None if none applies.
    """
    try:
        s = AbstractState.parse(state)
    except ValueError:
        return None
    facts = [(f, parse_fact(f)) for f in s.objects]
    refs = {p[1] for _, p in facts if p}
    kinds = []
    texts = [f for f, p in facts if p is None]
    if texts:
        kinds.append(lambda: f"click {rng.choice(texts)}")
    absent = next(r for r in range(1, 100) if r not in refs) if len(refs) < 99 else None
    if absent is not None:
        kinds.append(lambda: f"click [{absent:02d}] {rng.choice(CLICKABLE[:2])} \"{rng.choice(('ok', 'next', 'go'))}\"")
    heads = [p[0] for _, p in facts if p and p[2] not in FIELDS_KINDS]
    fields = [p[0] for _, p in facts if p and p[2] in FIELDS_KINDS]
    values = list(s.inventory) or ["text"]
    if heads:
        kinds.append(lambda: f'type "{rng.choice(values)}" into {rng.choice(heads)}')
    if fields:
        kinds.append(lambda: f'type "{rng.choice(("hello", "1234", "admin"))}" into {rng.choice(fields)}')
    allowed = set(candidates)
    for _ in range(10):
        if not kinds:
            return None
        action = rng.choice(kinds)()
        if action not in allowed:
            return action
    return None


def click(el: Element) -> str:
    return f"click {el.head()}"


def type_into(value: str, el: Element) -> str:
    return f'type "{_quote(value)}" into {el.head()}'


def expert_plan(task: str, fields, elements: list[Element]) -> list[str]:
    """The scripted expert of each task in ``TASKS``, from the task's own fields and the first page.

    Raises ValueError when the page lacks what the task's script needs (never seen on the seeds
    tested; see tests/test_miniwob_env.py).
    """
    f = dict(fields)

    def first(kind: str, text: str | None = None, dom_id: str | None = None) -> Element:
        for e in elements:
            if e.kind == kind and (text is None or e.text == text) and (dom_id is None or e.dom_id == dom_id):
                return e
        raise ValueError(f"MiniWoB {task}: no {kind} {text or dom_id or ''!r} on the page")

    match task:
        case "click-button":
            return [click(first("button", f["target"]))]
        case "click-link":
            return [click(first("link", f["target"]))]
        case "enter-text":
            return [type_into(f["target"], first("textbox")), click(first("button", "Submit"))]
        case "focus-text":
            return [click(first("textbox"))]
        case "click-checkboxes":
            targets = {v for k, v in fields if k.startswith("target")}
            return [click(e) for e in elements if e.kind == "checkbox" and e.text in targets] \
                + [click(first("button", "Submit"))]
        case "login-user":
            return [type_into(f["username"], first("textbox", dom_id="username")),
                    type_into(f["password"], first("password", dom_id="password")),
                    click(first("button", "Login"))]
    raise ValueError(f"MiniWoB task {task!r} has no expert; tasks with one: {', '.join(TASKS)}")


def dom_text(root, limit: int = 4000) -> str:
    """The raw DOM as indented lines (ref, tag, id, text, value) for ``RawObs.look``."""
    lines: list[str] = []

    def walk(el, depth: int) -> None:
        bits = [f"{'  ' * depth}{el.ref} {el.tag}"]
        if el.id:
            bits.append(f"#{el.id}")
        if el.text:
            bits.append(repr(el.text))
        if el.value not in (None, ""):
            bits.append(f"value={el.value!r}")
        lines.append(" ".join(bits))
        for c in el.children:
            walk(c, depth + 1)

    walk(root, 0)
    return "\n".join(lines)[:limit]
