"""The page's "Generation profiles" section (named settings files; not MMGP memory profiles).

A dropdown of the saved profiles (broken ones labelled), Save / Load / Rename / Delete, Export (a JSON
download), Import (an upload) and "Set as default for this model". The files are app/settings.py's
ProfileStore; the handlers here only read the page's controls and call it. Named API endpoints:
/profile_list, /profile_save, /profile_load, /profile_rename, /profile_delete, /profile_export,
/profile_import, /profile_set_default.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from app.settings import ProfileStore, TargetExists, profile_params
from app.ui_loras import parse_selection
from models.errors import UserError

BROKEN_MARK = "⚠ broken: "
REPLACE_LABEL = "Replace a profile of the same name"  # the checkbox; messages name it


def profile_choices(store: ProfileStore) -> list[tuple[str, str]]:
    """(label, name) for the dropdown; a broken file keeps its name and says why it is broken."""
    out = []
    for e in store.list():
        reason = e.error if len(e.error) <= 80 else e.error[:77] + "..."
        out.append((f"{e.name} ({BROKEN_MARK}{reason})" if e.broken else e.name, e.name))
    return out


def controls_to_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The page's values (model_type, prompt, the form's parameters by name, loras: the strengths text or a
    parsed selection) as profile settings; ProfileStore validates them."""
    def whole(v: Any) -> Any:
        return int(v) if isinstance(v, float) and v.is_integer() else v

    out: dict[str, Any] = {"model_type": values.get("model_type"), "prompt": values.get("prompt") or None}
    for p in profile_params():
        if p.name in values and p.name != "prompt":
            value = values[p.name]
            if isinstance(value, str) and p.kind in (int, float):  # a text box (optional numbers: "" = not set)
                try:
                    value = p.parse(value)
                except UserError:
                    pass  # the store names the bad value
            out[p.name] = whole(value)
    if "negative_prompt" in out:
        out["negative_prompt"] = out["negative_prompt"] or ""
    seed = whole(values["seed"] if values.get("seed") is not None else -1)
    out.update(seed_policy="random" if seed == -1 else "fixed", seed=seed)
    loras = values.get("loras")
    out["loras"] = loras if isinstance(loras, list) else parse_selection(loras)
    return out


def _error(e: UserError) -> gr.Error:
    if isinstance(e, TargetExists):  # the store does not know the page's checkbox
        e = UserError(f"{e}; tick '{REPLACE_LABEL}' to replace it")
    return gr.Error(str(e), title="Generation profile", print_exception=False)


class ExportFolder:
    """The one temporary folder a page's profile exports are written to (Gradio copies a returned file into its
    own cache): made at the first export, removed when the process exits. An export replaces the file of the
    same profile and drops those of deleted profiles, so the folder holds at most one file per profile."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._lock = threading.Lock()

    def path(self) -> Path:
        with self._lock:
            if self._path is None or not self._path.is_dir():
                self._path = Path(tempfile.mkdtemp(prefix="wgp-zimage-profile-"))
                atexit.register(shutil.rmtree, self._path, ignore_errors=True)
            return self._path

    def export(self, store: ProfileStore, profile: str) -> Path:
        """The profile written to <folder>/<profile>.json; its path."""
        folder = self.path()
        path = store.export_to(profile, folder / f"{profile}.json", overwrite=True)
        names = {e.name for e in store.list()}
        for old in folder.glob("*.json"):
            if old.stem not in names:
                old.unlink(missing_ok=True)
        return path


def build_profiles_section(store: ProfileStore, inputs: Mapping[str, Any], outputs: list,
                           to_updates: Callable[[dict[str, Any]], tuple], lora_names: Callable[[], list[str]]
                           ) -> dict[str, Any]:
    """Create the section's components (call inside the Blocks) and wire them.

    inputs: the controls whose values a profile keeps, by controls_to_settings' keys; outputs / to_updates:
    the controls a loaded profile sets and the values for them. Returns the components by elem_id.
    """
    keys, controls = list(inputs), list(inputs.values())
    exports = ExportFolder()

    def settings_of(values: tuple) -> dict[str, Any]:
        return controls_to_settings(dict(zip(keys, values)))

    c: dict[str, Any] = {}
    # the buttons sit at the foot of their row (class wgp-inline-btn, app/ui.py's CSS) instead of stretching
    # to the height of the labelled box beside them
    small = {"size": "sm", "scale": 1, "min_width": 60, "elem_classes": ["wgp-inline-btn"]}
    with gr.Accordion("Generation profiles", open=True, elem_id="profiles"):
        with gr.Row(equal_height=True):
            c["profile-select"] = gr.Dropdown(profile_choices(store), value=None, label="Saved generation profiles",
                                              elem_id="profile-select", scale=3,
                                              # names are checked by the store; a stale list must not raise
                                              allow_custom_value=True)
            c["profile-load"] = gr.Button("Load", elem_id="profile-load", **small)
            c["profile-delete"] = gr.Button("Delete", elem_id="profile-delete", variant="stop", **small)
        with gr.Row(equal_height=True):
            c["profile-name"] = gr.Textbox(label="Name (to save, rename or import as)", elem_id="profile-name",
                                           max_lines=1, scale=3)
            c["profile-save"] = gr.Button("Save", elem_id="profile-save", **small)
            c["profile-rename"] = gr.Button("Rename", elem_id="profile-rename", **small)
        c["profile-overwrite"] = gr.Checkbox(False, label=REPLACE_LABEL,
                                             elem_id="profile-overwrite")
        with gr.Row(equal_height=True):
            c["profile-set-default"] = gr.Button("Set as default for this model", elem_id="profile-set-default",
                                                 size="sm")
            c["profile-export"] = gr.Button("Export", elem_id="profile-export", size="sm")
            # a button, not a drop box: a 90 px box clipped its own "Drop File Here" text
            c["profile-import"] = gr.UploadButton("Import (.json)", elem_id="profile-import", file_types=[".json"],
                                                  type="filepath", size="sm")
        # hidden until there is something to download: an empty file box only took space
        c["profile-export-file"] = gr.File(label="Exported profile", elem_id="profile-export-file",
                                           interactive=False, height=90, visible=False)
        c["profile-status"] = gr.Markdown("", elem_id="profile-status")

    select, name, overwrite = c["profile-select"], c["profile-name"], c["profile-overwrite"]
    status = c["profile-status"]
    cheap = {"queue": False, "show_progress": "hidden"}

    def choices(value: str | None) -> Any:
        return gr.update(choices=profile_choices(store), value=value)

    def notify(warnings: list[str]) -> None:
        for w in warnings:
            gr.Warning(w)

    def list_profiles() -> list[dict[str, Any]]:
        """Every generation profile: name, broken, error."""
        return [{"name": e.name, "broken": e.broken, "error": e.error} for e in store.list()]

    gr.api(list_profiles, api_name="profile_list", queue=False)

    def save(profile: str, replace: bool, *controls: Any) -> tuple:
        """Save the current settings as a generation profile."""
        try:
            warnings = store.save((profile or "").strip(), settings_of(controls), overwrite=bool(replace),
                                  overwrite_broken=bool(replace))
        except UserError as e:
            raise _error(e) from None
        notify(warnings)
        saved = (profile or "").strip().removesuffix(".json")
        return choices(saved), f"Saved generation profile **{saved}**."

    c["profile-save"].click(save, [name, overwrite, *controls], [select, status], api_name="profile_save", **cheap)

    def load(profile: str | None) -> tuple:
        """Put a generation profile's settings into the controls."""
        try:
            if not profile:
                raise UserError("choose a generation profile first")
            settings, warnings = store.load(profile, available_loras=lora_names())
        except UserError as e:
            raise _error(e) from None
        notify(warnings)
        return (*to_updates(settings), f"Loaded generation profile **{profile}**.")

    c["profile-load"].click(load, select, [*outputs, status], api_name="profile_load", **cheap)

    def rename(profile: str | None, new: str, replace: bool) -> tuple:
        """Rename the chosen generation profile to the name in the box."""
        try:
            if not profile:
                raise UserError("choose a generation profile to rename first")
            new = (new or "").strip().removesuffix(".json")
            store.rename(profile, new, overwrite=bool(replace), overwrite_broken=bool(replace))
        except UserError as e:
            raise _error(e) from None
        return choices(new), f"Renamed **{profile}** to **{new}**."

    c["profile-rename"].click(rename, [select, name, overwrite], [select, status], api_name="profile_rename", **cheap)

    def delete(profile: str | None) -> tuple:
        """Delete the chosen generation profile."""
        try:
            if not profile:
                raise UserError("choose a generation profile to delete first")
            store.delete(profile)
        except UserError as e:
            raise _error(e) from None
        return choices(None), f"Deleted generation profile **{profile}**."

    c["profile-delete"].click(delete, select, [select, status], api_name="profile_delete", **cheap)

    def export(profile: str | None) -> tuple:
        """The chosen generation profile as a JSON file to download."""
        try:
            if not profile:
                raise UserError("choose a generation profile to export first")
            path = exports.export(store, profile)
        except UserError as e:
            raise _error(e) from None
        return str(path), f"Exported **{profile}**: download it above."

    # the file box shows once there is a file in it (an update from export itself would change what
    # /profile_export returns to API clients)
    c["profile-export"].click(export, select, [c["profile-export-file"], status], api_name="profile_export",
                              **cheap).success(lambda: gr.update(visible=True), None, c["profile-export-file"],
                                               api_visibility="private", **cheap)

    def import_file(path: str | None, profile: str, replace: bool) -> tuple:
        """Add an uploaded profile file (any schema) to the saved ones; named by the box or the file."""
        if not path:
            return gr.skip(), gr.skip()
        try:
            saved, warnings = store.import_from(path, name=(profile or "").strip() or None, overwrite=bool(replace),
                                                overwrite_broken=bool(replace), available_loras=lora_names())
        except UserError as e:
            raise _error(e) from None
        notify(warnings)
        return choices(saved), f"Imported generation profile **{saved}**."

    c["profile-import"].upload(import_file, [c["profile-import"], name, overwrite], [select, status],
                               api_name="profile_import", **cheap)

    def set_default(*controls: Any) -> str:
        """The current settings become what choosing this model type sets."""
        try:
            settings = settings_of(controls)
            warnings = store.set_model_defaults(settings["model_type"], settings)
        except UserError as e:
            raise _error(e) from None
        notify(warnings)
        return f"These settings are now the defaults of **{settings['model_type']}**."

    c["profile-set-default"].click(set_default, controls, status, api_name="profile_set_default", **cheap)
    return c


__all__ = ["ExportFolder", "build_profiles_section", "controls_to_settings", "profile_choices"]
