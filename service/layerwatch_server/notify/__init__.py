"""Notifications: the outbox (written with the alert change), payloads, channels, and the sender."""
