"""Paths a caller or the agent names, confined to the workspace."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


class WorkspaceError(ValueError):
    pass


def confine(workspace: Path, requested: str) -> Path:
    """Resolve `requested` (relative to the workspace, or absolute inside it) following symlinks; refuse
    anything that lands outside. Blocking (resolve touches the filesystem): call it from a thread when
    the path may be long."""
    if not requested or "\x00" in requested:
        raise WorkspaceError("path must be a non-empty file path")
    root = workspace.resolve()
    candidate = Path(requested)
    target = (candidate if candidate.is_absolute() else root / PurePosixPath(requested)).resolve()
    if target == root or not target.is_relative_to(root):
        raise WorkspaceError(f"path {requested!r} is outside the workspace")
    return target
