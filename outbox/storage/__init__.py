"""SQLite, shared by both sides: opening a file, its schema and migrations, error messages."""
