"""Moved to lightnets.files (the I/O that the engine and deployment share); kept so that
imports of lightnets.engine.files keep working."""

from lightnets.files import atomic_path, atomic_write_bytes, fsync_file, storage_errors

__all__ = ["atomic_path", "atomic_write_bytes", "fsync_file", "storage_errors"]
