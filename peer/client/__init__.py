"""Client mode (PEER_MODE=client): the person-facing app of one organization.

Same code and image as the peer service, but it talks ONLY to its own peer service over HTTP (DEJIMA_PEER_URL,
each call with a timeout of DEJIMA_PEER_TIMEOUT seconds, 30 by default), never to a database. It reads the peer
type's manifest (PEER_TYPE, DEJIMA_SQL_ROOT) to know the base tables, their columns and types, and the peer's
GET /api/v1/status to show with which peers each column is shared.

- Web app (peer/client/views.py): home page, rows of each base table, add / edit / delete a row; CSRF-protected.
- REST API (peer/client/api.py): /client/api/v1/tables[/<t>[/rows[/<id>]]].
- Every write is composed with psycopg.sql (Identifier, Literal) and run at the peer as one global transaction
  (POST /api/v1/exec); the outcome is told in plain words ("committed (reached bank, insurance)", "someone else
  changed this row at the same time; try again", "peer insurance is unreachable; nothing was changed").
"""
