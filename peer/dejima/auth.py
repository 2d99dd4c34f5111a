"""Authenticated peers: every peer-to-peer message, and every answer to one, is signed with the sender's Ed25519 key.

Keys. Each peer has one Ed25519 key pair: given by `DEJIMA_PRIVATE_KEY` / `DEJIMA_PRIVATE_KEY_FILE`, or kept in
`DEJIMA_KEY_FILE` (created at first start, mode 0600). Keys are written as PEM (PKCS#8) and read as PEM or as the
base64 of the 32-byte raw private key. A public key is the base64 of its 32 raw bytes. Each peer trusts the public
keys of `DEJIMA_TRUSTED_KEYS` / `DEJIMA_TRUSTED_KEYS_FILE` (peer name -> key) and its own.

The signature block. A signed envelope is the envelope of `peer.dejima.messages` whose `signature` is

    {"peer": <signer name>, "ts": <ms since the Unix epoch>, "id": <32 hex: fresh per signed envelope>,
     "reply_to": <the id of the request this answers; "" in a request>, "sig": <base64 of the 64-byte signature>}

and the signed bytes are `b"dejima-signature/1\\n"` followed by the canonical JSON of

    {"protocol": …, "kind": …, "body": …, "peer": …, "ts": …, "id": …, "reply_to": …}

where canonical JSON is `jsonvalues.canonical(value)`: keys sorted, no spaces, non-ASCII characters escaped, a
number with a fraction written exactly as received (UTF-8 bytes; only ASCII in fact). The body is signed as it is
on the wire (the JSON object received), not as re-serialized.

Encoding once. The canonical JSON of the body begins the signed bytes (`"body"` sorts first), so a signer encodes
the body once: `sign_envelope` keeps its canonical text, and `wire` writes the envelope with that text as its first
member (the rest compact JSON). A receiver that reads such bytes with `read_envelope` keeps the body's text as it
came, and `verify_request` / `verify_reply` check the signature over it first, then, when that fails (a sender whose
body text is not canonical), over the canonical JSON of the body received: the same signed bytes, without encoding
the body again (a message's body is most of it: a propagate's rows). Sound, as the body checked is the one parsed
from exactly the text signed; an envelope from `read_envelope` must be verified before anything changes it.

Requests (`verify_request`, at the message endpoint) are refused with 401 when: there is no signature or it is
malformed; the signer is not a trusted peer; the signature does not verify with the signer's trusted key (forged, or
the message was changed); `ts` is more than the replay window (`DEJIMA_REPLAY_WINDOW`, 60 s) away from the receiver's
clock (stale); the signature `id` was already accepted from that signer within the window (replayed; ids are
remembered until their timestamp leaves the window, so a replay is refused whenever it comes); `ts` is before this
process started (`not_before`: the ids it remembers are those accepted since, so a request signed before a restart is
refused as a replay whatever its id; senders sign every call anew, so only a message caught in flight across the
restart is lost, and its call fails as it would have). A request that
carries `reply_to` is an answer replayed as a request: refused. Then (403, `authorize`): the peer a message claims
to come from (`Propagate.sender`, `Prepare/Finish.origin`, `DecisionQuery.asker`, `Hello.peer`) must be the signer.

Replays and retries. A replay of an identical signed envelope is refused (401) and applies nothing. A sender's
legitimate retry is a *new* signed envelope (new id and timestamp) carrying the same body `message_id`: the
coordinator answers it with its first answer (idempotency), as before.

Answers (`verify_reply`, in `Transport.call`): signed the same way by the answering peer, with `reply_to` the id of
the request, so an answer cannot be replayed to another request. An answer that is unsigned, forged, from an
untrusted key, stale, not bound to the request, or whose claimed peer (`PropagateReply.peer`, `Ack.peer`,
`Hello.peer`) is not its signer, is treated as no answer (the call fails with kind `refused`). Error answers
(4xx/5xx JSON errors, not envelopes) are not signed: they can only make a call fail, never succeed.

Not covered: the recipient is not in the signed bytes, so a captured request could be replayed once to *another*
peer that trusts the sender (each receiver keeps its own replay memory). Such a peer still applies only what the
sender may send it (view membership, view columns). A message sent to several peers is signed once
(`Transport.call_many`): every recipient gets the same envelope, checks it and remembers its id for itself; one who
captured it on the way to one recipient and delivered it to another first would make the sender's own copy a
replay there (a failed call: the transaction aborts), which is no more than dropping it on the way could do.
Transport privacy is TLS's job (https URLs), not this module's.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from peer.dejima import jsonvalues
from peer.dejima.messages import Ack, DecisionQuery, Finish, Hello, Message, Prepare, Propagate, PropagateReply

log = logging.getLogger(__name__)

DOMAIN = b"dejima-signature/1\n"
SIGNATURE_FIELDS = frozenset({"peer", "ts", "id", "reply_to", "sig"})
DEFAULT_REPLAY_WINDOW = 60.0


class KeyFormatError(ValueError):
    """A key is malformed (the text says why)."""


class AuthError(Exception):
    """A message is refused: 401 (not authenticated) or 403 (authenticated, not allowed)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


# ---- keys -----------------------------------------------------------------------------------------------------


def parse_private_key(text: str | bytes) -> Ed25519PrivateKey:
    """A private key from PEM (PKCS#8) or from the base64 of its 32 raw bytes."""
    data = text.encode() if isinstance(text, str) else text
    data = data.strip()
    if data.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFormatError(f"not a readable PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFormatError(f"a {type(key).__name__}, not an Ed25519 private key")
        return key
    raw = _b64(data, "private key")
    if len(raw) != 32:
        raise KeyFormatError(f"an Ed25519 private key is 32 bytes, this one is {len(raw)}")
    return Ed25519PrivateKey.from_private_bytes(raw)


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key from the base64 of its 32 raw bytes."""
    raw = _b64(text.strip().encode(), "public key")
    if len(raw) != 32:
        raise KeyFormatError(f"an Ed25519 public key is 32 bytes, this one is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def _b64(data: bytes, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{what} is neither PEM nor base64") from None


def private_pem(key: Ed25519PrivateKey) -> bytes:
    pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, none)


def public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def write_key_file(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a new key file readable by its owner only (mode 0600; the folder is created 0700). Never overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem(key))


def read_key_file(path: Path) -> Ed25519PrivateKey:
    """A key file of this peer (`DEJIMA_KEY_FILE`): refused when others may read it."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFormatError(f"{path} may be read by others (mode {mode:04o}); run chmod 600 {path}")
    return parse_private_key(path.read_bytes())


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The key kept in `path`, created (mode 0600) when there is none yet."""
    try:
        return read_key_file(path)
    except FileNotFoundError:
        pass
    key = Ed25519PrivateKey.generate()
    try:
        write_key_file(path, key)
    except FileExistsError:  # another process created it meanwhile: use that one
        return read_key_file(path)
    log.info("created the peer's key pair in %s (public key %s)", path, public_b64(key))
    return key


# ---- signing ----------------------------------------------------------------------------------------------------


def canonical(value: Any) -> bytes:
    return jsonvalues.canonical(value).encode()


BODY_FIRST = '{"body":'


class SignedEnvelope(dict[str, Any]):
    """An envelope as `sign_envelope` made it, with the canonical JSON of its body (`body_text`), for `wire`."""

    body_text: str


class ReceivedEnvelope(dict[str, Any]):
    """An envelope as `read_envelope` read it, with its body's JSON text as it came (`body_text`)."""

    body_text: str


def signed_bytes(
    envelope: Mapping[str, Any], peer: str, ts: int, sig_id: str, reply_to: str, body_text: str | None = None
) -> bytes:
    """What is signed (see the module docstring); `body_text`: the canonical JSON of the envelope's body, when the
    caller has it."""
    rest = {"protocol": envelope.get("protocol"), "kind": envelope.get("kind"), "peer": peer, "ts": ts, "id": sig_id}
    rest["reply_to"] = reply_to
    if body_text is None:
        return DOMAIN + canonical({**rest, "body": envelope.get("body")})
    # the canonical JSON of the whole, "body" being its first key: the body's text, then the rest's members
    return DOMAIN + (BODY_FIRST + body_text + "," + jsonvalues.canonical(rest)[1:]).encode()


def sign_envelope(
    envelope: Mapping[str, Any], peer: str, key: Ed25519PrivateKey, reply_to: str = "", ts: int | None = None
) -> SignedEnvelope:
    """A copy of `envelope` signed by `peer` with `key` (an answer when `reply_to` is the request's id)."""
    ts = int(time.time() * 1000) if ts is None else ts
    sig_id = uuid.uuid4().hex
    body_text = jsonvalues.canonical(envelope.get("body"))
    sig = key.sign(signed_bytes(envelope, peer, ts, sig_id, reply_to, body_text))
    signature = {"peer": peer, "ts": ts, "id": sig_id, "reply_to": reply_to, "sig": base64.b64encode(sig).decode()}
    signed = SignedEnvelope({**envelope, "signature": signature})
    signed.body_text = body_text
    return signed


def _verifies(public: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def wire(value: Any) -> bytes:
    """The JSON bytes to send: a signed envelope's with the body's canonical text first (encoded once, when it was
    signed; the envelope must not have changed since), anything else compact JSON."""
    if not isinstance(value, SignedEnvelope) or "body" not in value:
        return jsonvalues.dumps(value).encode()
    rest = jsonvalues.dumps({k: v for k, v in value.items() if k != "body"})
    return (BODY_FIRST + value.body_text + ("," + rest[1:] if rest != "{}" else "}")).encode()


def read_envelope(data: bytes) -> Any:
    """Parse a JSON body (`jsonvalues.loads_request`); an object whose first member is "body", as `wire` writes it,
    as a `ReceivedEnvelope` that keeps the body's text. Raises `jsonvalues.TooDeep` (a ValueError) for a body nested
    deeper than `jsonvalues.MAX_DEPTH`, before anything decodes it; ValueError for malformed JSON, as
    `jsonvalues.loads_request`."""
    text = jsonvalues.request_text(data)
    if text.startswith(BODY_FIRST) and text.isascii():
        try:
            body, end = jsonvalues.decode_request_at(text, len(BODY_FIRST))
            rest = jsonvalues.decode_request("{" + text[end + 1 :]) if text[end] == "," else None
        except (ValueError, IndexError):
            rest = None
        if isinstance(rest, dict) and "body" not in rest:
            envelope = ReceivedEnvelope(body=body, **rest)
            envelope.body_text = text[len(BODY_FIRST) : end]
            return envelope
    return jsonvalues.decode_request(text)


def signature_id(envelope: Mapping[str, Any]) -> str:
    """The id of a signed envelope's signature ("" when it has none)."""
    sig = envelope.get("signature")
    return str(sig.get("id", "")) if isinstance(sig, dict) else ""


def claimed_peer(msg: Message) -> str | None:
    """The peer a message says it comes from (None when it names none)."""
    if isinstance(msg, Propagate):
        return msg.sender
    if isinstance(msg, Prepare | Finish):
        return msg.origin
    if isinstance(msg, DecisionQuery):
        return msg.asker
    if isinstance(msg, Hello | PropagateReply | Ack):
        return msg.peer
    return None


class Authenticator:
    """This peer's key, the keys it trusts, and its memory of accepted signature ids (replays)."""

    def __init__(
        self,
        name: str,
        key: Ed25519PrivateKey,
        trusted: Mapping[str, Ed25519PublicKey],
        window: float = DEFAULT_REPLAY_WINDOW,
        not_before: float | None = None,
    ) -> None:
        """`not_before`: a time (seconds since the epoch, normally when the peer process started) before which no
        request's signature is accepted: the signature ids seen before it are not remembered here."""
        self.name = name
        self.key = key
        self.public_key = public_b64(key)
        mine = trusted.get(name)
        if mine is not None and public_b64(mine) != self.public_key:
            raise ValueError(f"the trusted key for {name!r} (this peer) is not this peer's public key")
        self.trusted: dict[str, Ed25519PublicKey] = {**trusted, name: key.public_key()}
        self.window = window
        self.not_before_ms = None if not_before is None else int(not_before * 1000)
        self._seen: dict[tuple[str, str], int] = {}  # (signer, id) -> ms until which it is remembered
        self._expiry: list[tuple[int, tuple[str, str]]] = []  # heap of the same
        self._lock = threading.Lock()

    def sign(self, envelope: Mapping[str, Any], reply_to: str = "") -> SignedEnvelope:
        return sign_envelope(envelope, self.name, self.key, reply_to)

    # ---- verification -------------------------------------------------------------------------------------------
    def _check(self, envelope: Mapping[str, Any], now_ms: int) -> tuple[str, int, str, str]:
        """Signature present, well-formed, by a trusted key, valid, fresh: (signer, ts, id, reply_to). Raises 401."""
        sig = envelope.get("signature")
        if sig is None:
            raise AuthError(401, "unsigned message: every peer message must be signed")
        if not isinstance(sig, dict) or set(sig) != SIGNATURE_FIELDS:
            raise AuthError(401, f"malformed signature: expected an object with fields {sorted(SIGNATURE_FIELDS)}")
        peer, ts, sig_id, reply_to, sig_b64 = (sig[f] for f in ("peer", "ts", "id", "reply_to", "sig"))
        if not all(isinstance(v, str) for v in (peer, sig_id, reply_to, sig_b64)) or not (
            isinstance(ts, int) and not isinstance(ts, bool) and abs(ts) < 2**63  # a float of it: no OverflowError
        ):
            raise AuthError(401, "malformed signature: peer, id, reply_to and sig are strings, ts is a 64-bit integer")
        if not sig_id:
            raise AuthError(401, "malformed signature: empty id")
        public = self.trusted.get(peer)
        if public is None:
            raise AuthError(401, f"signed by {peer!r}, which is not a trusted peer here (no key configured for it)")
        try:
            raw = base64.b64decode(sig_b64, validate=True)
            # the body's text as it came first; then (no text came, or it is not the canonical one) the canonical
            # JSON of the body
            as_it_came = isinstance(envelope, ReceivedEnvelope) and _verifies(
                public, raw, signed_bytes(envelope, peer, ts, sig_id, reply_to, envelope.body_text)
            )
            if not as_it_came:
                public.verify(raw, signed_bytes(envelope, peer, ts, sig_id, reply_to))
        except (binascii.Error, ValueError, InvalidSignature):
            raise AuthError(
                401, f"bad signature: not signed by {peer!r}'s trusted key, or the message was changed"
            ) from None
        skew = abs(now_ms - ts) / 1000
        if skew > self.window:
            raise AuthError(401, f"stale message: its timestamp is {skew:.0f}s away (the window is ±{self.window:g}s)")
        return peer, ts, sig_id, reply_to

    def verify_request(self, envelope: Mapping[str, Any], now: float | None = None) -> str:
        """Authenticate a request; the signer's name. Raises AuthError(401) (see the module docstring)."""
        now_ms = int((time.time() if now is None else now) * 1000)
        peer, ts, sig_id, reply_to = self._check(envelope, now_ms)
        if reply_to:
            raise AuthError(401, "an answer is not a request (the signature has reply_to)")
        if self.not_before_ms is not None and ts < self.not_before_ms:
            early = (self.not_before_ms - ts) / 1000
            raise AuthError(
                401,
                f"replayed message: signed {early:.3f}s before this peer started, and the signature ids accepted"
                " before a restart are not remembered (a sender signs every call anew)",
            )
        key = (peer, sig_id)
        with self._lock:
            while self._expiry and self._expiry[0][0] < now_ms:
                _, old = heapq.heappop(self._expiry)
                if self._seen.get(old, now_ms) < now_ms:
                    del self._seen[old]
            if key in self._seen:
                raise AuthError(401, f"replayed message: signature id {sig_id} from {peer!r} was already accepted")
            until = ts + int(self.window * 1000) + 1000  # remembered until its timestamp leaves the window
            self._seen[key] = until
            heapq.heappush(self._expiry, (until, key))
        return peer

    def verify_reply(self, envelope: Mapping[str, Any], request_id: str, now: float | None = None) -> str:
        """Authenticate an answer to our request `request_id`; the signer's name. Raises AuthError."""
        now_ms = int((time.time() if now is None else now) * 1000)
        peer, _, _, reply_to = self._check(envelope, now_ms)
        if reply_to != request_id:
            raise AuthError(401, "the answer is not bound to this request (reply_to differs)")
        return peer


def authorize(signer: str, msg: Message) -> None:
    """The peer a message claims to come from must be its signer; raises AuthError(403)."""
    claimed = claimed_peer(msg)
    if claimed is not None and claimed != signer:
        raise AuthError(403, f"signed by {signer!r} but the {msg.kind} claims to come from {claimed!r}")


def trusted_keys(items: Mapping[str, str]) -> dict[str, Ed25519PublicKey]:
    return {name: parse_public_key(b64) for name, b64 in items.items()}
