"""The PostgreSQL inbox's numbered SQL migrations, package data read by ``receiver.postgres``.

Each file runs in one transaction with its row in ``outbox_schema``, under an advisory lock, so
several receivers starting at once apply each migration once.
"""
