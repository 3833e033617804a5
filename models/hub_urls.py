"""Hugging Face file URLs, parsed without the hub client (what a model folder's file is called needs no
network library; the downloader in models/downloads.py uses the same rule)."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from models.errors import UserError


def hub_file(url: str) -> tuple[str, str, tuple[str, ...]]:
    """(repo id, revision, the file's path in the repo as parts) of `https://<host>/<owner>/<repo>/resolve/
    <revision>/<path>`; UserError for another URL or a path that could leave the folder it is put in."""
    parts = [unquote(p) for p in urlparse(url).path.split("/") if p]
    if len(parts) < 5 or parts[2] not in ("resolve", "blob") or parts[0] in ("datasets", "spaces"):
        raise UserError(
            f"not a Hugging Face model file URL: {url!r} (expected https://huggingface.co/<owner>/<repo>/resolve/main/<file>)"
        )
    path = tuple(parts[4:])
    if any(p in ("..", ".") for p in path) or any("\\" in p for p in path):
        raise UserError(f"unsafe file path in URL: {url!r}")  # the path becomes a local path
    return f"{parts[0]}/{parts[1]}", parts[3], path


__all__ = ["hub_file"]
