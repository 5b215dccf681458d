"""Safe file reads and writes: output folders checked before work starts, written atomically, never lost.

* :func:`check_output_dir` validates an output folder up front (not the current folder, a writable parent, not
  existing unless ``overwrite``), so a bad ``--out`` fails in seconds, not after training.
* :func:`reserve_output` holds an exclusive lock on a target for a whole job: a second process (or a second thread
  of this one) writing the same target fails at once with a clear message instead of silently replacing the first one's result.
* :func:`atomic_dir` builds a folder in a temp folder beside the target and moves it into place with one rename:
  ``RENAME_NOREPLACE`` for a new target (a folder that appeared meanwhile is never replaced), ``RENAME_EXCHANGE``
  for an overwrite (the target is the old or the new version at every instant). Where the file system lacks
  those, the overwrite keeps the old version in a hidden folder until the new one is in place, and restores it
  if the process died in between; a reader that finds the target missing puts it back too
  (:func:`find_interrupted`). The temp folder is removed on any error, KeyboardInterrupt and SIGTERM, and a
  killed writer's by the next write once its owner lock shows the writer is gone.
* :func:`read_json` / :func:`write_json`: bounded, clear-error reads; atomic writes.
* Against other users: every file and folder is flushed to disk before the rename that publishes it; permissions
  are set by descriptor, links are never followed (lock files, the temp folder's contents), a folder every user may
  write without the sticky bit is refused as a place to write, and files carried from a replaced version keep their
  permissions (:func:`keep_mode`).

Four modules, one seam each: :mod:`.folders` (output folders and their locks), :mod:`.files` (single-file writes),
:mod:`.durable` (flushed to disk, permissions, before a rename) and :mod:`.reads` (bounded JSON reads). The names
below are the package's API.
"""

from .durable import keep_mode
from .files import check_file_target, check_json_target, write_figure, write_json, write_text
from .folders import (
    OutputError,
    atomic_dir,
    check_apart,
    check_output_dir,
    check_replaceable,
    previous_version,
    raise_on_sigterm,
    recover_interrupted,
    reserve_output,
)
from .reads import MAX_JSON_BYTES, brief, file_sha256, find_interrupted, read_config_json, read_json

__all__ = [
    "MAX_JSON_BYTES", "OutputError", "atomic_dir", "brief", "check_apart", "check_file_target", "check_json_target",
    "check_output_dir", "check_replaceable", "file_sha256", "find_interrupted", "keep_mode", "previous_version",
    "raise_on_sigterm",
    "read_config_json", "read_json", "recover_interrupted", "reserve_output", "write_figure", "write_json", "write_text",
]
