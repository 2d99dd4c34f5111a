"""The wire format between peers: JSON, versioned, every message a typed dataclass in this one module.

Envelope: `{"protocol": "dejima/1", "kind": <kind>, "body": {...}, "signature": null}`. The signature field is the
seam for authenticated peers (filled and checked by `peer.dejima.transport`, not here).

View rows on the wire are JSON objects of the view's columns, plus two optional markers whose names can never be
column names (manifest names are `[a-z_][a-z0-9_]*`):
- `"$unknown": ["address", …]` — columns whose value the sender's putback invented (a default), not known;
- `"$was": {"first_name": …, "last_name": …}` — on an insertion, the identity key the same row had before
  (a key change: receivers rename in place).
A delta keeps the prototype's shape `{view, insertions, deletions}`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Self

PROTOCOL = "dejima/1"
UNKNOWN = "$unknown"
WAS = "$was"

Row = dict[str, Any]
Vote = Literal["yes", "no"]
Outcome = Literal["commit", "abort", "pending"]
# Why a participant voted no; the origin turns these into HTTP statuses for its client.
ErrorKind = Literal["conflict", "constraint", "unreachable", "timeout", "bad_request", "refused", "internal"]


class MessageError(ValueError):
    """A message is malformed: wrong protocol, unknown kind, missing or mistyped field."""


def new_message_id() -> str:
    return uuid.uuid4().hex


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # message class -> its field names, in order


@dataclass(frozen=True)
class Message:
    kind: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        """The envelope. Its body holds the message's own field values (no deep copy, as `asdict` makes: they are
        JSON values already, and the envelope is serialised at once): do not change it."""
        names = _FIELD_NAMES.get(type(self))
        if names is None:
            names = _FIELD_NAMES[type(self)] = tuple(f.name for f in fields(self))
        body = {name: getattr(self, name) for name in names}
        return {"protocol": PROTOCOL, "kind": self.kind, "body": body, "signature": None}

    @classmethod
    def from_body(cls, body: object) -> Self:
        if not isinstance(body, dict):
            raise MessageError(f"{cls.kind}: body must be an object")
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in body and f.default is f.default_factory]
        unknown = sorted(set(body) - names)
        if unknown:
            raise MessageError(f"{cls.kind}: unknown field {unknown[0]!r}")
        if missing:
            raise MessageError(f"{cls.kind}: missing field {missing[0]!r}")
        try:
            msg = cls(**body)
        except TypeError as exc:
            raise MessageError(f"{cls.kind}: {exc}") from None
        msg.validate()
        return msg

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"str": str, "int": int, "bool": bool, "list[Row]": list, "list[str]": list}.get(str(f.type))
            if expected is not None and (
                not isinstance(value, expected) or isinstance(value, bool) != (expected is bool)
            ):
                raise MessageError(f"{self.kind}: field {f.name!r} must be {f.type}")


@dataclass(frozen=True)
class Propagate(Message):
    """A delta of one dejima view, sent by `sender` within global transaction `gxid` started at `origin`."""

    kind: ClassVar[str] = "propagate"
    gxid: str
    origin: str
    sender: str
    view: str
    insertions: list[Row]
    deletions: list[Row]
    timeout_ms: int
    message_id: str = field(default_factory=new_message_id)
    # The identity keys the origin itself changed, per view (omitted when large). The origin sends its own version
    # of those rows to every member directly, so nobody forwards them back to it.
    origin_keys: dict[str, list[list[Any]]] = field(default_factory=dict)
    # Every member of the view's group the sender sent this view's delta to in the same fan-out (or found to have
    # it already): each has these rows, so the receiver forwards none of them to those members again.
    recipients: list[str] = field(default_factory=list)
    # The origin's log head when it sent the delta ({"seq", "hash"}; passed on as it came when forwarded): a
    # participant that stages an entry records it there (peer.dejima.txlog, truncation evidence).
    origin_head: dict[str, Any] = field(default_factory=dict)
    # The whole global transaction waits on this branch alone (each sender on the way sent this gxid to nobody
    # else): once the branch has answered yes, nothing can reach the receiver again, so it prepares right away and
    # says so in its reply (`prepared`), and the origin's prepare round skips it.
    prepare: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.recipients, list) or not all(isinstance(r, str) for r in self.recipients):
            raise MessageError("propagate: recipients must be a list of peer names")
        for row in [*self.insertions, *self.deletions]:
            if not isinstance(row, dict):
                raise MessageError("propagate: every row must be an object")
        if not 0 < self.timeout_ms < 2**63:  # a receiver divides it (a float): no OverflowError
            raise MessageError("propagate: timeout_ms must be positive (and a 64-bit integer)")
        if not isinstance(self.origin_keys, dict) or not all(
            isinstance(v, list) and all(isinstance(k, list) for k in v) for v in self.origin_keys.values()
        ):
            raise MessageError("propagate: origin_keys must map views to lists of keys")
        if self.origin_head and not _is_head(self.origin_head, participant=False):
            raise MessageError('propagate: origin_head must be {} or {"seq": n >= 0, "hash": text}')


@dataclass(frozen=True)
class PropagateReply(Message):
    """A participant's vote, and every peer its branch of the propagation reached (itself included)."""

    kind: ClassVar[str] = "propagate_reply"
    gxid: str
    peer: str
    vote: Vote
    reached: list[str]
    error: str = ""
    error_kind: str = ""
    message_id: str = field(default_factory=new_message_id)
    prepared: list[str] = field(default_factory=list)  # peers of the branch that prepared already (`prepare`)
    # of each of those: its log head when it prepared, whether it staged an entry and that entry's digest (`Ack.head`)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.prepared, list) or not all(isinstance(p, str) for p in self.prepared):
            raise MessageError("propagate_reply: prepared must be a list of peer names")
        if not isinstance(self.heads, dict) or not all(
            isinstance(k, str) and _is_head(v, participant=True) for k, v in self.heads.items()
        ):
            raise MessageError("propagate_reply: heads must map peer names to log heads")


@dataclass(frozen=True)
class Prepare(Message):
    kind: ClassVar[str] = "prepare"
    gxid: str
    origin: str
    message_id: str = field(default_factory=new_message_id)


@dataclass(frozen=True)
class Finish(Message):
    """The origin's decision for a participant: `commit` (COMMIT PREPARED) or `abort` (roll back, prepared or not)."""

    kind: ClassVar[str] = "finish"
    gxid: str
    origin: str
    decision: str
    message_id: str = field(default_factory=new_message_id)

    def validate(self) -> None:
        super().validate()
        if self.decision not in ("commit", "abort"):
            raise MessageError("finish: decision must be 'commit' or 'abort'")


@dataclass(frozen=True)
class Ack(Message):
    """Answer to prepare and finish: ok, or the reason it is not."""

    kind: ClassVar[str] = "ack"
    gxid: str
    peer: str
    ok: bool
    error: str = ""
    error_kind: str = ""
    # a prepare's: the participant's log head when it prepared ({"seq", "hash"}), whether it staged an entry for
    # this gxid ("logged") and that entry's digest ("entry"); the origin records them in its own entry
    head: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        if self.head and not _is_head(self.head, participant=True):
            raise MessageError('ack: head must be {} or {"seq", "hash", "logged", "entry"}')


@dataclass(frozen=True)
class DecisionQuery(Message):
    """Recovery: a participant with a prepared transaction asks the origin what was decided."""

    kind: ClassVar[str] = "decision_query"
    gxid: str
    asker: str


@dataclass(frozen=True)
class DecisionReply(Message):
    kind: ClassVar[str] = "decision_reply"
    gxid: str
    outcome: str  # commit | abort | pending


@dataclass(frozen=True)
class Hello(Message):
    """Discovery: who I am, what I share (my catalog), and the peers I know."""

    kind: ClassVar[str] = "hello"
    peer: str
    url: str
    peer_type: str
    catalog: list[dict[str, Any]]
    known: list[dict[str, str]]

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.catalog, list) or not all(_is_view_signature(view) for view in self.catalog):
            raise MessageError(
                'hello: catalog must be a list of views {"view", "columns": [[name, type], …], "key", "members"}'
            )
        if not isinstance(self.known, list) or not all(
            isinstance(peer, dict) and all(isinstance(v, str) for v in peer.values()) for peer in self.known
        ):
            raise MessageError("hello: known must be a list of objects of strings (name, url, peer_type)")


def _is_head(value: object, participant: bool) -> bool:
    """A log head as messages carry it: {"seq": n >= 0, "hash": text}, a participant's with "logged" (a boolean)
    and "entry" (text) too."""
    fields = {"seq", "hash", "logged", "entry"} if participant else {"seq", "hash"}
    if not isinstance(value, dict) or set(value) != fields:
        return False
    seq = value["seq"]
    if not (isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63 and isinstance(value["hash"], str)):
        return False
    return not participant or (isinstance(value["logged"], bool) and isinstance(value["entry"], str))


def _texts(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_view_signature(entry: object) -> bool:
    """A view of a hello's catalog, as `View.signature` writes it (a receiver reads these fields)."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("view"), str)
        and isinstance(entry.get("columns"), list)
        and all(_texts(column) and len(column) == 2 for column in entry["columns"])
        and _texts(entry.get("key"))
        and _texts(entry.get("members"))
    )


KINDS: dict[str, type[Message]] = {
    m.kind: m for m in (Propagate, PropagateReply, Prepare, Finish, Ack, DecisionQuery, DecisionReply, Hello)
}


def parse(envelope: object) -> Message:
    """Parse and validate an envelope into its typed message."""
    if not isinstance(envelope, dict):
        raise MessageError("a message must be a JSON object")
    if envelope.get("protocol") != PROTOCOL:
        raise MessageError(f"unsupported protocol {envelope.get('protocol')!r}; this peer speaks {PROTOCOL}")
    kind = envelope.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise MessageError(f"unknown message kind {kind!r}")
    return KINDS[kind].from_body(envelope.get("body"))
