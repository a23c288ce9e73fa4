"""The numbered SQL migrations, package data read by ``outbox.storage.schema``."""
