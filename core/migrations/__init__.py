"""Alembic migrations of the Tether database; run them with :func:`core.db.migrate`."""
