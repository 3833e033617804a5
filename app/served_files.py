"""Which local files the web server may send: only the images the gallery lists.

Gradio serves `/gradio_api/file=PATH` for any PATH under `allowed_paths`. Allowing the output folder let
anyone read every file in it (the queue and the config when the state folder is the output folder), and a
saved output folder of `/` exposed the whole disk. Instead `allowed_paths` is a `ServedFiles` list of exact
file paths that the gallery adds to as it lists images; Gradio copies those into its cache and the page
loads them from there. Gradio reads `allowed_paths` at every request, so additions apply at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path


class ServedFiles(list):
    """The gallery's files, newest additions last, at most `keep` of them (a bounded allow-list)."""

    def __init__(self, keep: int = 200):
        super().__init__()
        self.keep = keep
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return True  # Gradio replaces a falsy (empty) allowed_paths with its own list: stay this one

    def allow(self, paths: Iterable[str | Path]) -> None:
        """Let the server send these files (exact paths; never folders)."""
        new = [os.path.abspath(p) for p in paths]
        with self._lock:
            fresh = set(new)
            kept = [p for p in self if p not in fresh] + list(dict.fromkeys(new))
            self[:] = kept[-self.keep:]  # one slice assignment: requests read a whole list, old or new


_registry: dict[str, ServedFiles] = {}
_registry_lock = threading.Lock()


def served_files(output_dir: str | Path) -> ServedFiles:
    """The one ServedFiles of an output folder: build_ui's gallery adds to it, launch_options serves it."""
    key = os.path.abspath(output_dir)
    with _registry_lock:
        return _registry.setdefault(key, ServedFiles())
