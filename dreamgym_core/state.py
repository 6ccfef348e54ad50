"""Abstract textual states (paper §4.1 and §4.5).

DreamGym's experience model reasons over *abstract* text states rather than raw observations:
compact, canonical and deterministic, so that the same mapping serves real and synthetic steps.
Every adapter maps its raw observation to an ``AbstractState``:

    feedback:  what the last action produced (one line, whitespace collapsed)
    location:  where the agent is
    objects:   visible things as canonical facts, sorted ("fridge (closed)", "counter: apple")
    exits:     ways out, sorted ("south: pantry (open frosted-glass door)")
    inventory: carried items, sorted

Departure from the paper: the paper leaves the abstraction to prompting a large LLM; we make it
an explicit, parseable structure so a small model can predict a *change* to it (issue: tiny
models cannot regenerate full states; see shared/notes/feasibility-tiny-experience-model.md)
and code can apply that change. ``render`` / ``parse`` round-trip exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

SEP = " | "
FIELDS = ("feedback", "location", "objects", "exits", "inventory")
_WS = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Collapse whitespace, drop the list separator and newlines so a value fits on one line."""
    return _WS.sub(" ", (text or "").replace("|", "/")).strip()


def _canon_list(items) -> tuple[str, ...]:
    return tuple(sorted({clean_text(i) for i in items if clean_text(i)}))


@dataclass(frozen=True)
class AbstractState:
    feedback: str = ""
    location: str = ""
    objects: tuple[str, ...] = field(default_factory=tuple)
    exits: tuple[str, ...] = field(default_factory=tuple)
    inventory: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def make(cls, feedback: str = "", location: str = "", objects=(), exits=(), inventory=()) -> "AbstractState":
        """Canonicalize: one-line values, sorted de-duplicated lists."""
        return cls(clean_text(feedback), clean_text(location), _canon_list(objects),
                   _canon_list(exits), _canon_list(inventory))

    def render(self) -> str:
        return "\n".join([
            f"feedback: {self.feedback}",
            f"location: {self.location}",
            f"objects: {SEP.join(self.objects)}",
            f"exits: {SEP.join(self.exits)}",
            f"inventory: {SEP.join(self.inventory)}",
        ])

    def with_feedback(self, feedback: str) -> "AbstractState":
        return replace(self, feedback=clean_text(feedback))

    @classmethod
    def parse(cls, text: str) -> "AbstractState":
        """Inverse of ``render``. Raises ValueError naming the offending line on malformed text."""
        values: dict[str, str] = {}
        for n, line in enumerate((text or "").split("\n"), 1):
            key, sep, value = line.partition(": ")
            if not sep and line.endswith(":"):
                key, value = line[:-1], ""
            elif not sep:
                raise ValueError(f"abstract state line {n}: expected '<field>: <value>', got {line[:60]!r}")
            if key not in FIELDS:
                raise ValueError(f"abstract state line {n}: unknown field {key!r} (fields: {', '.join(FIELDS)})")
            if key in values:
                raise ValueError(f"abstract state line {n}: field {key!r} repeated")
            values[key] = value
        missing = [f for f in FIELDS if f not in values]
        if missing:
            raise ValueError(f"abstract state: missing field(s) {', '.join(missing)}")

        def split(v: str) -> tuple[str, ...]:
            return tuple(x for x in v.split(SEP) if x) if v else ()

        return cls.make(values["feedback"], values["location"], split(values["objects"]),
                        split(values["exits"]), split(values["inventory"]))

    def entities(self) -> list[str]:
        """Names mentioned in the state (objects, their contents, inventory), for candidate rules."""
        names: list[str] = []
        for fact in self.objects:
            head, _, contents = fact.partition(": ")
            names.append(re.sub(r" \((?:open|closed)\)$", "", head))
            if contents and contents != "empty":
                names.extend(c.strip() for c in contents.split(", ") if c.strip())
        names.extend(self.inventory)
        return list(dict.fromkeys(names))
