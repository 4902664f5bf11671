"""Plumbing shared by every app and knowing none: the action registry, the API base view, the
error shape, the principal, the Redis client, the health-probe registry, the hot path and the
process supervisor. Nothing here imports an app; apps plug in through the hooks defined here."""
