"""The wire schema of the peer's HTTP API, as DRF serializers: what the OpenAPI schema (GET /api/v1/openapi.json)
says each endpoint takes and answers. The views (peer/dejima/views.py) validate their input themselves, with the
messages the tests pin; these serializers describe it (they are not used to parse requests).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema_field
from rest_framework import serializers

from peer.dejima.messages import KINDS, PROTOCOL

MESSAGE_KINDS = tuple(sorted(KINDS))
ERROR_KINDS = (
    "bad_request",
    "bad_sql",
    "forbidden",
    "unauthenticated",
    "unauthorized",
    "forbidden",
    "refused",
    "conflict",
    "constraint",
    "unreachable",
    "busy",
    "timeout",
    "internal",
    "not_found",
)


class ErrorSerializer(serializers.Serializer[Any]):
    """Every error of the peer API: nothing was done, `error` says why in plain words (naming the peer)."""

    status = serializers.ChoiceField(choices=["error"])
    kind = serializers.ChoiceField(choices=ERROR_KINDS, help_text="why: maps to the HTTP status")
    error = serializers.CharField()
    sqlstate = serializers.CharField(
        required=False,
        help_text="PostgreSQL's SQLSTATE, when the client's own statement failed (bad_sql, forbidden, …)",
    )


class MethodNotAllowedSerializer(serializers.Serializer[Any]):
    """The framework's answer to a method the endpoint does not take (405, with an Allow header)."""

    detail = serializers.CharField()


class HealthSerializer(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["ok"])
    peer = serializers.CharField()
    peer_type = serializers.CharField()


class UnhealthySerializer(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["unhealthy"])
    peer = serializers.CharField()
    error = serializers.CharField(help_text="why the database cannot be reached")


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "minLength": 1, "description": "one or more SQL statements"},
            {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        ]
    }
)
class StatementsField(serializers.Field[Any, Any, Any, Any]):
    """A non-empty string, or a non-empty list of non-empty strings."""


class StatementsSerializer(serializers.Serializer[Any]):
    """`{"sql": "<statements>"}` or `{"sql": ["<statement>", …]}`; no other field. Blank statements are refused."""

    sql = StatementsField()


class QuerySerializer(serializers.Serializer[Any]):
    """`{"sql": "<one read-only statement>"}`; no other field."""

    sql = StatementsField(help_text="exactly one read-only statement (a one-element list is accepted too)")


class CommittedSerializer(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["committed"])
    gxid = serializers.CharField(help_text="the global transaction's id: <origin>.<start ns, hex>.<random>")
    participants = serializers.ListField(child=serializers.CharField(), help_text="every other peer it reached")
    ms = serializers.FloatField(help_text="milliseconds from start to the answer")
    batch = serializers.IntegerField(
        min_value=1,
        help_text="client transactions committed in this global transaction (1: alone; more: writes that waited for a"
        " turn together, DEJIMA_BATCH_MAX)",
    )
    phases = serializers.DictField(
        child=serializers.FloatField(), required=False, help_text="milliseconds per phase of the commit protocol"
    )


class QueryResultSerializer(serializers.Serializer[Any]):
    columns = serializers.ListField(child=serializers.CharField())
    rows = serializers.ListField(child=serializers.ListField(child=serializers.JSONField()))


class PeerSummarySerializer(serializers.Serializer[Any]):
    name = serializers.CharField()
    url = serializers.CharField()
    peer_type = serializers.CharField()
    status = serializers.ChoiceField(choices=["up", "unreachable", "unknown"])
    views = serializers.ListField(child=serializers.CharField())
    incompatible = serializers.DictField(
        child=serializers.CharField(), help_text="view -> why its schema there is incompatible with this peer's"
    )
    last_seen = serializers.FloatField(help_text="when it last answered (seconds since the epoch; 0: never)")


class PeerGroupSerializer(serializers.Serializer[Any]):
    """Herr's attribute-level peer group: attributes keyed by the set of dejima views they occur in."""

    views = serializers.ListField(child=serializers.CharField())
    attributes = serializers.ListField(child=serializers.CharField())
    peers = serializers.ListField(child=serializers.CharField())


class GroupsSerializer(serializers.Serializer[Any]):
    groups = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()), help_text="dejima view -> the peers that share it"
    )
    peer_groups = PeerGroupSerializer(many=True)


class HandshakesSerializer(serializers.Serializer[Any]):
    full = serializers.IntegerField(min_value=0, help_text="TLS handshakes that made a new session")
    resumed = serializers.IntegerField(min_value=0, help_text="TLS handshakes that resumed an earlier session")
    failed = serializers.IntegerField(min_value=0, help_text="TLS handshakes refused or failed")


class ListenerStatsSerializer(serializers.Serializer[Any]):
    connections = serializers.IntegerField(min_value=0, help_text="connections accepted since start")
    handshakes = HandshakesSerializer()


class TransportStatsSerializer(serializers.Serializer[Any]):
    connections = serializers.IntegerField(min_value=0, help_text="connections made to other peers since start")
    requests = serializers.IntegerField(min_value=0, help_text="answers read from other peers since start")
    handshakes = HandshakesSerializer()


class TlsStatusSerializer(serializers.Serializer[Any]):
    enabled = serializers.BooleanField(help_text="whether this peer speaks TLS (DEJIMA_TLS_CERT_FILE, …)")
    client_certs = serializers.ChoiceField(
        choices=["none", "require"], help_text="DEJIMA_TLS_CLIENT_CERTS: the message listener asks for a certificate"
    )
    transport = TransportStatsSerializer(help_text="this peer's calls to other peers")
    listeners = serializers.DictField(
        child=ListenerStatsSerializer(), help_text="the lean listeners (message, api) and what they accepted"
    )


class EntitlementSerializer(serializers.Serializer[Any]):
    peer_type = serializers.CharField(help_text="the peer type it is trusted as; empty when its views are named")
    views = serializers.ListField(child=serializers.CharField(), help_text="this peer's views it may hold")


class RefusedClaimSerializer(serializers.Serializer[Any]):
    reason = serializers.CharField()
    count = serializers.IntegerField(min_value=1, help_text="greetings that made this claim")
    first = serializers.FloatField(help_text="seconds since the epoch")
    last = serializers.FloatField(help_text="seconds since the epoch")


class StatusSerializer(GroupsSerializer):
    peer = serializers.CharField()
    peer_type = serializers.CharField()
    url = serializers.CharField()
    views = serializers.ListField(child=serializers.CharField(), help_text="the dejima views this peer shares")
    peers = PeerSummarySerializer(many=True)
    stats = serializers.DictField(child=serializers.IntegerField(), help_text="counters of the commit protocol")
    messages_received = serializers.DictField(
        child=serializers.IntegerField(), help_text="peer messages received since start, by kind (both listeners)"
    )
    propagates_received = serializers.DictField(
        child=serializers.IntegerField(),
        help_text="propagates received since start, by the view whose rows they carried (refused ones included)",
    )
    entitlements = serializers.DictField(
        child=EntitlementSerializer(),
        help_text="trusted peer -> what this peer's configuration (DEJIMA_TRUSTED_KEYS[_FILE]) lets it hold here",
    )
    refused_claims = serializers.DictField(
        child=serializers.DictField(child=RefusedClaimSerializer()),
        help_text="peer -> view (or `peer_type`) -> a claim of its greetings refused since start: it is not entitled"
        " to that view here, or announced another peer type than it is trusted as",
    )
    open_transactions = serializers.IntegerField(min_value=0)
    queued_transactions = serializers.IntegerField(
        min_value=0, help_text="client transactions waiting here for a turn (DEJIMA_MAX_ACTIVE, DEJIMA_BATCH_RUNNING)"
    )
    commit_wait = serializers.ChoiceField(
        choices=["decision", "all"], help_text="DEJIMA_COMMIT_WAIT: when this peer answers its clients 'committed'"
    )
    tls = TlsStatusSerializer(help_text="TLS between peers: its connections and handshakes")


class ViewRowsSerializer(serializers.Serializer[Any]):
    view = serializers.CharField()
    columns = serializers.ListField(child=serializers.CharField())
    rows = serializers.ListField(
        child=serializers.ListField(child=serializers.JSONField()), help_text="one array per row, sorted by the key"
    )
    digest = serializers.CharField(help_text="sha256 of the rows, independent of their order")


class PreparedTransactionSerializer(serializers.Serializer[Any]):
    gid = serializers.CharField()
    prepared = serializers.CharField(help_text="when it was prepared")


class PreparedSerializer(serializers.Serializer[Any]):
    prepared = PreparedTransactionSerializer(many=True)


class TxlogEntrySerializer(serializers.Serializer[Any]):
    seq = serializers.IntegerField()
    gxid = serializers.CharField()
    origin = serializers.CharField()
    role = serializers.CharField()
    views = serializers.JSONField()
    committed_at = serializers.CharField()
    prev_hash = serializers.CharField()
    hash = serializers.CharField()
    witness = serializers.JSONField(
        allow_null=True, help_text="what the partners of that global transaction told of their logs (their heads)"
    )


class TxlogHeadSerializer(serializers.Serializer[Any]):
    seq = serializers.IntegerField()
    gxid = serializers.CharField()
    hash = serializers.CharField()
    committed_at = serializers.CharField()


class TxlogVerdictSerializer(serializers.Serializer[Any]):
    ok = serializers.BooleanField()
    length = serializers.IntegerField()
    broken_at = serializers.IntegerField(allow_null=True, help_text="the first seq where the chain breaks")
    reason = serializers.CharField(allow_blank=True)
    head_hash = serializers.CharField()


class TxlogWitnessedSerializer(serializers.Serializer[Any]):
    """What this peer's chain recorded of a partner's log: the highest head it was told, and the partner's entries
    it knows of (how many, and the XOR of their sha256)."""

    head = serializers.DictField(allow_null=True, help_text="{seq, hash, recorded_at}: the highest head it was told")
    count = serializers.IntegerField()
    digest = serializers.CharField()


class TxlogOwedSerializer(serializers.Serializer[Any]):
    count = serializers.IntegerField()
    digest = serializers.CharField()


class TxlogPairSerializer(serializers.Serializer[Any]):
    peer = serializers.CharField()
    recorded = serializers.ListField(child=serializers.ListField(), help_text="[gxid, entry digest, seq here]")
    owed = serializers.ListField(child=serializers.ListField(), help_text="[gxid, entry digest, seq here]")


class TxlogSerializer(serializers.Serializer[Any]):
    peer = serializers.CharField()
    length = serializers.IntegerField()
    head = TxlogHeadSerializer(allow_null=True)
    entries = TxlogEntrySerializer(many=True)
    verify = TxlogVerdictSerializer(required=False, help_text="only with verify=1")
    witnessed = serializers.DictField(
        child=TxlogWitnessedSerializer(),
        required=False,
        help_text="only with verify=1: per partner, what this chain recorded of its log",
    )
    witnessed_by = serializers.DictField(
        child=TxlogOwedSerializer(),
        required=False,
        help_text="only with verify=1: per partner, the entries of this peer its chain must know of",
    )
    at = serializers.DictField(
        child=serializers.CharField(allow_null=True), required=False, help_text="only with at=: seq -> hash"
    )
    pair = TxlogPairSerializer(required=False, help_text="only with verify=1&pair=")
    seal_error = serializers.CharField(required=False, help_text="why the staged entries could not be sealed first")


class MachinerySerializer(serializers.Serializer[Any]):
    """Whether the peer type's triggers, functions and privileges in the database are what the manifest generates
    (peer/dejima/machinery.py); what differs, one line each."""

    peer = serializers.CharField()
    ok = serializers.BooleanField()
    problems = serializers.ListField(child=serializers.CharField())


class SignatureSerializer(serializers.Serializer[Any]):
    """Ed25519 signature of the envelope by `peer` (peer/dejima/auth.py)."""

    peer = serializers.CharField()
    ts = serializers.IntegerField(help_text="milliseconds since the epoch; refused outside the replay window")
    id = serializers.CharField(help_text="unique per signature; a second use is refused as a replay")
    reply_to = serializers.CharField(allow_blank=True, help_text="on an answer: the id of the request's signature")
    sig = serializers.CharField(help_text="base64")


class PropagateBodySerializer(serializers.Serializer[Any]):
    """A delta of one dejima view within global transaction `gxid` (rows: objects of the view's columns)."""

    gxid = serializers.CharField()
    origin = serializers.CharField()
    sender = serializers.CharField()
    view = serializers.CharField()
    insertions = serializers.ListField(child=serializers.DictField())
    deletions = serializers.ListField(child=serializers.DictField())
    timeout_ms = serializers.IntegerField(min_value=1)
    message_id = serializers.CharField(required=False, help_text="a retry carries the same id: same first answer")
    origin_keys = serializers.DictField(
        child=serializers.ListField(child=serializers.ListField(child=serializers.JSONField())), required=False
    )
    recipients = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        help_text="the members of the view's group the sender sent this delta to in the same fan-out",
    )
    prepare = serializers.BooleanField(required=False, help_text="prepare once the branch answered yes")
    origin_head = serializers.DictField(
        required=False, help_text="{seq, hash}: the origin's log head, recorded by a participant in its entry"
    )


class PrepareBodySerializer(serializers.Serializer[Any]):
    gxid = serializers.CharField()
    origin = serializers.CharField()
    message_id = serializers.CharField(required=False)


class FinishBodySerializer(serializers.Serializer[Any]):
    gxid = serializers.CharField()
    origin = serializers.CharField()
    decision = serializers.ChoiceField(choices=["commit", "abort"])
    message_id = serializers.CharField(required=False)


class DecisionQueryBodySerializer(serializers.Serializer[Any]):
    gxid = serializers.CharField()
    asker = serializers.CharField()


class HelloBodySerializer(serializers.Serializer[Any]):
    peer = serializers.CharField()
    url = serializers.CharField()
    peer_type = serializers.CharField()
    catalog = serializers.ListField(child=serializers.DictField(), help_text="the dejima views it shares")
    known = serializers.ListField(child=serializers.DictField(child=serializers.CharField()))


class _Envelope(serializers.Serializer[Any]):
    protocol = serializers.ChoiceField(choices=[PROTOCOL])
    signature = SignatureSerializer(allow_null=True, help_text="required: an unsigned message is refused (401)")


class PropagateEnvelopeSerializer(_Envelope):
    kind = serializers.ChoiceField(choices=["propagate"])
    body = PropagateBodySerializer()


class PrepareEnvelopeSerializer(_Envelope):
    kind = serializers.ChoiceField(choices=["prepare"])
    body = PrepareBodySerializer()


class FinishEnvelopeSerializer(_Envelope):
    kind = serializers.ChoiceField(choices=["finish"])
    body = FinishBodySerializer()


class DecisionQueryEnvelopeSerializer(_Envelope):
    kind = serializers.ChoiceField(choices=["decision_query"])
    body = DecisionQueryBodySerializer()


class HelloEnvelopeSerializer(_Envelope):
    kind = serializers.ChoiceField(choices=["hello"])
    body = HelloBodySerializer()


EnvelopeSerializer = PolymorphicProxySerializer(
    component_name="Envelope",
    serializers={
        "propagate": PropagateEnvelopeSerializer,
        "prepare": PrepareEnvelopeSerializer,
        "finish": FinishEnvelopeSerializer,
        "decision_query": DecisionQueryEnvelopeSerializer,
        "hello": HelloEnvelopeSerializer,
    },
    resource_type_field_name="kind",
    many=False,
)
"""A signed peer message (peer/dejima/messages.py): the envelope's `kind` says what its `body` is."""


@extend_schema_field(OpenApiTypes.OBJECT)
class AnswerBodyField(serializers.DictField):
    """The typed answer: propagate_reply, ack, decision_reply or hello."""


class AnswerSerializer(serializers.Serializer[Any]):
    """The answer to a peer message, signed by this peer and bound to the request (`signature.reply_to`)."""

    protocol = serializers.ChoiceField(choices=[PROTOCOL])
    kind = serializers.ChoiceField(choices=MESSAGE_KINDS)
    body = AnswerBodyField()
    signature = SignatureSerializer()
