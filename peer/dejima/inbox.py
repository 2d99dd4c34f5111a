"""What a peer does with a message another peer sends it: `handle_message`, run by both fronts of
`/peer/v1/message` (the Django endpoint in peer/dejima/views.py and the lean listener in peer/dejima/peerserver.py),
so both check, answer and refuse exactly alike.

Statuses: 200 the typed answer, signed by this peer and bound to the request; 400 malformed or not a request;
401 unsigned, forged, untrusted, stale or replayed; 403 (kind `refused`) signed by another peer than it claims, a
propagate for a view its sender is not entitled to hold here (DEJIMA_TRUSTED_KEYS: peer.dejima.directory), from
outside the view's group, or with a column outside the view, and a greeting announcing another peer type than the
one its sender is trusted as. Nothing of a refused message is applied.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from peer.dejima.auth import AuthError, authorize, signature_id
from peer.dejima.directory import GreetingRefused
from peer.dejima.messages import DecisionQuery, Finish, Hello, Message, MessageError, Prepare, Propagate, parse
from peer.dejima.runtime import get_runtime

log = logging.getLogger(__name__)

REQUESTS = (Propagate, Prepare, Finish, DecisionQuery, Hello)
_counts: dict[str, int] = {}
_view_counts: dict[str, int] = {}
MAX_VIEWS_COUNTED = 64
OTHER_VIEWS = "(other)"
_counts_lock = threading.Lock()


def received() -> dict[str, int]:
    """Peer messages this process was sent, by kind (both fronts; "malformed": not a message), since it started."""
    with _counts_lock:
        return dict(_counts)


def received_views() -> dict[str, int]:
    """Propagates this process was sent since it started, by the view whose rows they carried, refused ones
    included: which views' rows reached this peer."""
    with _counts_lock:
        return dict(_view_counts)


def _count(kind: str) -> None:
    with _counts_lock:
        _counts[kind] = _counts.get(kind, 0) + 1


def _count_view(view: str) -> None:
    with _counts_lock:
        if view not in _view_counts and len(_view_counts) >= MAX_VIEWS_COUNTED:
            view = OTHER_VIEWS  # names come from unchecked messages: a bounded table
        _view_counts[view] = _view_counts.get(view, 0) + 1


def error(status: int, message: str, kind: str = "bad_request") -> tuple[int, dict[str, Any]]:
    return status, {"status": "error", "kind": kind, "error": message}


def authenticate(envelope: dict[str, Any], msg: Message) -> None:
    """Who signed it, that it is who it claims to be, and (propagate) that it may write the view. Raises AuthError:
    401 unsigned, forged, untrusted, stale or replayed; 403 not who it claims, not entitled to the view here (this
    peer's configuration), not a member of the view's group, or a row with a column outside the view."""
    rt = get_runtime()
    signer = rt.auth.verify_request(envelope)
    authorize(signer, msg)
    views = rt.directory.my_views
    if not isinstance(msg, Propagate) or msg.view not in views:
        return  # an unknown view is answered with a "no" vote (bad_request) by the coordinator
    if not rt.directory.entitled(msg.sender, msg.view):
        raise AuthError(
            403,
            f"{msg.sender!r} is not entitled to {msg.view} here (its entitlement:"
            f" {rt.directory.describe_entitlement(msg.sender)}; DEJIMA_TRUSTED_KEYS)",
        )
    if msg.sender not in rt.directory.members(msg.view):
        raise AuthError(403, f"{msg.sender!r} is not a member of {msg.view}'s group")
    allowed = {c for c, _ in views[msg.view]["columns"]}
    for row in (*msg.insertions, *msg.deletions):
        if not isinstance(row, dict):
            continue  # malformed: the coordinator's "no" vote says why
        outside = sorted(str(c) for c in row if not str(c).startswith("$") and c not in allowed)
        if outside:
            raise AuthError(
                403, f"{msg.sender!r} may write only the view's columns: {outside[0]!r} is not a column of {msg.view}"
            )


def handle_message(envelope: Any, remote: str) -> tuple[int, dict[str, Any]]:
    """The decoded JSON body of a request to /peer/v1/message -> (HTTP status, JSON answer)."""
    rt = get_runtime()
    try:
        msg = parse(envelope)
    except MessageError as exc:
        _count("malformed")
        return error(400, str(exc))
    _count(msg.kind)
    if isinstance(msg, Propagate):
        _count_view(msg.view)
    if not isinstance(msg, REQUESTS):
        return error(400, f"{msg.kind} is not a request")
    assert isinstance(envelope, dict)  # parse accepts objects only
    try:
        authenticate(envelope, msg)
    except AuthError as exc:
        sig = envelope.get("signature")
        signer = sig.get("peer") if isinstance(sig, dict) else None
        log.warning("refused a %s (signed by %r) from %s with %d: %s", msg.kind, signer, remote, exc.status, exc)
        return error(exc.status, f"{rt.config.name}: {exc}", "unauthenticated" if exc.status == 401 else "refused")
    coord = rt.coordinator
    answer: Message
    if isinstance(msg, Propagate):
        answer = coord.on_propagate(msg)
    elif isinstance(msg, Prepare):
        answer = coord.on_prepare(msg)
    elif isinstance(msg, Finish):
        answer = coord.on_finish(msg)
    elif isinstance(msg, DecisionQuery):
        answer = coord.on_decision_query(msg)
    else:
        try:
            rt.directory.learn(msg)
        except GreetingRefused as exc:  # learn logged it
            return error(403, f"{rt.config.name}: {exc}", "refused")
        answer = rt.directory.hello()
    return 200, rt.auth.sign(answer.to_json(), reply_to=signature_id(envelope))
