"""Label selectors: parse `site=plant-7,tier in (1,2),!canary,env!=lab` into a queryset filter.

The syntax is Kubernetes' label-selector syntax. Requirements are separated by commas
and all must hold:

    key=value  key==value  key!=value     equality (!= also matches devices without the key)
    key in (a,b)  key notin (a,b)         set membership
    key  !key                             the label exists / does not exist

A few keys name device fields instead of labels: site (slug), tier, status, model
(hardware model), accelerator, arch, online (true/false) and group (group slug).
Write `labels.site=x` to mean a label that happens to share such a name.

`compile_selector` returns a `Q` object: the whole selection runs in PostgreSQL (labels
use the GIN-indexed jsonb containment operator), never in a per-device Python loop.
Errors raise `SelectorError` whose message points at the offending column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.db.models import Q

LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
LABEL_KEY_MAX = 253
LABEL_VALUE_MAX = 63
MAX_SELECTOR_LENGTH = 4096

_TOKEN_RE = re.compile(r"\s*(?:(?P<op>==|!=|=|!|\(|\)|,)|(?P<word>[A-Za-z0-9._/-]+))")


class SelectorError(ValueError):
    """A selector that cannot be parsed. `position` is the 0-based column of the problem."""

    def __init__(self, message: str, *, selector: str, position: int) -> None:
        self.reason = message
        self.selector = selector
        self.position = position
        super().__init__(f"{message} at column {position + 1}")

    def pretty(self) -> str:
        return f"{self}\n  {self.selector}\n  {' ' * self.position}^"


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: tuple[str, ...] = ()


def validate_label_key(key: str) -> str | None:
    """Return a reason the label key is invalid, or None."""
    if len(key) > LABEL_KEY_MAX or not LABEL_KEY_RE.match(key):
        return (
            f"invalid label key {key!r}: use letters, digits, '-', '_' and '.', starting and ending "
            "with a letter or digit (an optional 'prefix/' is allowed)"
        )
    return None


def validate_label_value(value: str) -> str | None:
    if len(value) > LABEL_VALUE_MAX or not LABEL_VALUE_RE.match(value):
        return (
            f"invalid label value {value!r}: at most {LABEL_VALUE_MAX} letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit"
        )
    return None


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN_RE.match(text, pos)
        if not match:
            bad = pos + (len(text[pos:]) - len(text[pos:].lstrip()))
            raise SelectorError(f"unexpected character {text[bad]!r}", selector=text, position=bad)
        kind = "op" if match.group("op") else "word"
        start = match.start(kind)
        tokens.append((kind, match.group(kind), start))
        pos = match.end()
    tokens.append(("end", "", len(text)))
    return tokens


def parse_selector(text: str) -> list[Requirement]:
    """Parse a selector into requirements; an empty selector selects everything."""
    if len(text) > MAX_SELECTOR_LENGTH:
        raise SelectorError(f"selector longer than {MAX_SELECTOR_LENGTH} characters", selector=text[:80], position=0)
    tokens = _tokenize(text)
    if tokens[0][0] == "end":
        return []
    requirements: list[Requirement] = []
    i = 0

    def expect_word(what: str) -> tuple[str, int]:
        nonlocal i
        kind, value, pos = tokens[i]
        if kind != "word":
            found = "end of selector" if kind == "end" else repr(value)
            raise SelectorError(f"expected {what}, found {found}", selector=text, position=pos)
        i += 1
        return value, pos

    def check_key(key: str, pos: int) -> None:
        bare = key[len("labels.") :] if key.startswith("labels.") else key
        reason = validate_label_key(bare)
        if reason:
            raise SelectorError(reason, selector=text, position=pos)

    def check_value(value: str, pos: int) -> None:
        reason = validate_label_value(value)
        if reason:
            raise SelectorError(reason, selector=text, position=pos)

    while True:
        kind, value, pos = tokens[i]
        if kind == "op" and value == "!":
            i += 1
            key, kpos = expect_word("a label key after '!'")
            check_key(key, kpos)
            requirements.append(Requirement(key, "!exists"))
        else:
            key, kpos = expect_word("a label key")
            check_key(key, kpos)
            kind, value, pos = tokens[i]
            if kind == "op" and value in ("=", "==", "!="):
                i += 1
                # An empty value (`env=`) is allowed, as in Kubernetes.
                if tokens[i][0] == "word":
                    val, vpos = expect_word("a value")
                    check_value(val, vpos)
                else:
                    val = ""
                requirements.append(Requirement(key, "!=" if value == "!=" else "=", (val,)))
            elif kind == "word" and value in ("in", "notin"):
                i += 1
                kind, val, vpos = tokens[i]
                if not (kind == "op" and val == "("):
                    raise SelectorError(f"expected '(' after {value!r}", selector=text, position=vpos)
                i += 1
                values: list[str] = []
                while True:
                    item, ipos = expect_word("a value")
                    check_value(item, ipos)
                    values.append(item)
                    kind, sep, spos = tokens[i]
                    i += 1
                    if kind == "op" and sep == ")":
                        break
                    if not (kind == "op" and sep == ","):
                        raise SelectorError("expected ',' or ')' in the value list", selector=text, position=spos)
                requirements.append(Requirement(key, value, tuple(values)))
            elif kind in ("end",) or (kind == "op" and value == ","):
                requirements.append(Requirement(key, "exists"))
            else:
                raise SelectorError(
                    f"expected '=', '!=', 'in', 'notin', ',' or end after {key!r}, found {value!r}",
                    selector=text,
                    position=pos,
                )
        kind, value, pos = tokens[i]
        if kind == "end":
            return requirements
        if kind == "op" and value == ",":
            i += 1
            if tokens[i][0] == "end":
                raise SelectorError("trailing ','", selector=text, position=pos)
            continue
        raise SelectorError(f"expected ',' between requirements, found {value!r}", selector=text, position=pos)


# Keys that address device fields. Each maps to a function building the Q for one value,
# plus a validator for the value.
def _tier_q(v: str) -> Q:
    if v not in ("1", "2", "3"):
        raise ValueError(f"tier must be 1, 2 or 3, not {v!r}")
    return Q(tier=int(v))


def _status_q(v: str) -> Q:
    from fleet.models import DeviceStatus

    if v not in DeviceStatus.values:
        raise ValueError(f"status must be one of {', '.join(DeviceStatus.values)}, not {v!r}")
    return Q(status=v)


def _accelerator_q(v: str) -> Q:
    from fleet.models import Accelerator

    if v not in Accelerator.values:
        raise ValueError(f"accelerator must be one of {', '.join(Accelerator.values)}, not {v!r}")
    return Q(accelerator=v)


def _online_q(v: str) -> Q:
    if v not in ("true", "false"):
        raise ValueError(f"online must be true or false, not {v!r}")
    return Q(online=(v == "true"))


def _group_q(v: str) -> Q:
    from fleet.models import DeviceGroup

    members = DeviceGroup.devices.through.objects.filter(devicegroup__slug=v).values("device_id")
    return Q(id__in=members)


FIELD_KEYS = {
    "site": lambda v: Q(site__slug=v),
    "tier": _tier_q,
    "status": _status_q,
    "model": lambda v: Q(hardware_model=v),
    "accelerator": _accelerator_q,
    "arch": lambda v: Q(arch=v),
    "online": _online_q,
    "group": _group_q,
}


def _requirement_q(req: Requirement) -> Q:
    if req.key in FIELD_KEYS:
        build = FIELD_KEYS[req.key]
        if req.op in ("exists", "!exists"):
            if req.key != "site":
                raise ValueError(f"{req.key!r} is a device field; write {req.key}=… or {req.key} in (…)")
            q = Q(site__isnull=False)
            return q if req.op == "exists" else ~q
        any_of = Q()
        for value in req.values:
            any_of |= build(value)
        return any_of if req.op in ("=", "in") else ~any_of
    key = req.key[len("labels.") :] if req.key.startswith("labels.") else req.key
    if req.op == "exists":
        return Q(labels__has_key=key)
    if req.op == "!exists":
        return ~Q(labels__has_key=key)
    any_of = Q()
    for value in req.values:
        any_of |= Q(labels__contains={key: value})
    # `!=`/`notin` also match devices that lack the key, as in Kubernetes.
    return any_of if req.op in ("=", "in") else ~any_of


def compile_selector(text: str) -> Q:
    """Parse and compile a selector to a Q over fleet.Device. Raises SelectorError."""
    q = Q()
    for req in parse_selector(text):
        try:
            q &= _requirement_q(req)
        except ValueError as exc:
            position = text.find(req.key)
            raise SelectorError(str(exc), selector=text, position=max(position, 0)) from None
    return q
