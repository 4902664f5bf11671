"""Django's PostgreSQL backend with a health check that costs no round trip.

With CONN_HEALTH_CHECKS Django runs `SELECT 1` before the first query of every request: under load
that was one extra PostgreSQL round trip per API call (about a third of a single-event POST's
database time). A persistent connection that the server has closed or terminated (restart,
idle timeout, pg_terminate_backend) has its FATAL message or EOF waiting on the socket, and we
do not LISTEN, so an idle healthy connection has nothing to read. Polling the socket (one
non-blocking select) tells the two apart; only when something is waiting does the usual
`SELECT 1` decide.
"""

from __future__ import annotations

import select

from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
    def is_usable(self) -> bool:
        conn = self.connection
        if conn is None or conn.closed or conn.broken:
            return False
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        return bool(super().is_usable())
