"""The page's controls of the declared generation parameters, built from their declarations.

Each parameter of app/ui_form.form_params() gets one control of its declared kind (`Param.widget`),
range, label and help, in its declared group ("main" or "advanced") and row. A family's handler may
show a parameter in another group, or hide it, per model type (`FamilyHandler.param_layout`); such a
parameter gets a mirror control in each other group it can appear in, kept equal in the browser, and
the visible one follows the chosen model. Parameters of another family are hidden. The control in the
declared group is the one the jobs read. No torch here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import gradio as gr

from app.ui_uploads import image_input
from models.params import Param

HIDDEN = "hidden"


def make_control(p: Param, value: Any, visible: bool, elem_id: str, **extra: Any) -> gr.components.Component:
    """One control for p. Numbers the user types are number boxes or sliders; a slider's range is the
    declaration's (or its narrower slider_maximum), and anything typed beyond what `Param.parse` accepts
    is refused at Generate with the CLI's message."""
    info = p.help or None
    common = {"label": p.label, "elem_id": elem_id, "visible": visible, "info": info, **extra}
    if p.widget == "image":  # the input, and a brush whose strokes are the mask (white = repaint)
        common.pop("info")
        return image_input(value=None, type="filepath", sources=("upload", "clipboard"), height=360,
                             brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=24),
                             eraser=gr.Eraser(default_size=24), transforms=(), layers=False,
                             **{**common, "label": f"{p.label} (paint the area to repaint)"})
    if p.widget == "picture":  # a picture used as it is (a control image)
        common.pop("info")
        return gr.Image(value=None, type="filepath", image_mode="RGB", sources=("upload", "clipboard"), height=240,
                        **common)
    if p.widget == "mask":  # an uploaded mask, added to the painted one
        common.pop("info")
        return gr.Image(value=None, type="filepath", image_mode="L", sources=("upload", "clipboard"), height=160,
                        **{**common, "label": f"{p.label} (optional upload; white = repaint)"})
    if p.optional and p.kind in (int, float) and not p.choices:
        # a text box: empty means "not set" (a number box shows and sends 0 for nothing)
        return gr.Textbox("" if value is None else str(value), lines=1, max_lines=1, placeholder="auto", **common)
    if p.kind is str:
        if p.choices or p.widget == "dropdown":
            return gr.Dropdown(list(p.choices), value=value, **common)
        return gr.Textbox(value, lines=2, max_lines=12, **common)
    if p.kind is bool:
        return gr.Checkbox(bool(value), **common)
    if p.widget == "dropdown":
        return gr.Dropdown(list(p.choices), value=value, **common)
    if p.widget == "slider" and p.minimum is not None and p.maximum is not None:
        top = p.slider_maximum if p.slider_maximum is not None else p.maximum
        start = value if value is None else min(max(value, p.minimum), top)
        return gr.Slider(p.minimum, top, start, step=p.step or (1 if p.kind is int else 0.01), **common)
    return gr.Number(value, precision=0 if p.kind is int else None, step=p.step or 1, **common)


def shown_value(p: Param, value: Any) -> Any:
    """value as the control can show it: a slider narrower than the accepted range shows its end; an optional
    number's text box shows nothing for None."""
    if p.optional and p.kind in (int, float) and not p.choices:
        return "" if value is None else str(value)
    if (p.widget == "slider" and p.slider_maximum is not None and isinstance(value, (int, float))
            and not isinstance(value, bool)):
        return min(value, p.slider_maximum)
    return value


class ParamForm:
    """The declared parameters' controls and where each model type shows them.

    params: the parameters, in the form's order. layouts: per model type, {name: group or "hidden"}
    for every parameter (`placements` builds it from the handlers); values: the first values shown.
    """

    def __init__(self, params: Iterable[Param], layouts: Mapping[str, Mapping[str, str]], values: Mapping[str, Any],
                 first_model: str, conditions: Mapping[str, Mapping[str, str]] | None = None):
        self.params = list(params)
        self.layouts = {t: dict(v) for t, v in layouts.items()}
        # per model type, {name: the parameter it needs set} on top of each declaration's `needs`
        self.conditions = {t: dict(v) for t, v in (conditions or {}).items()}
        self.values = dict(values)
        self.first_model = first_model
        self.controls: dict[str, gr.components.Component] = {}  # the ones the jobs read
        self.mirrors: dict[tuple[str, str], gr.components.Component] = {}  # (name, group) -> a copy

    def place(self, model_type: str | None, p: Param) -> str:
        layout = self.layouts.get(model_type or "", {})
        return layout.get(p.name, HIDDEN if model_type in self.layouts else p.group)

    def groups_of(self, p: Param) -> set[str]:
        """Every group p appears in for some model type (its declared one always: it holds the control)."""
        return {p.group, *(layout.get(p.name, HIDDEN) for layout in self.layouts.values())} - {HIDDEN}

    def has_group(self, group: str) -> bool:
        return any(group in self.groups_of(p) for p in self.params)

    def build(self, group: str, before: Mapping[str, Callable[[], Any]] | None = None,
              after: Mapping[str, Callable[[], Any]] | None = None) -> None:
        """Create the controls of group (call inside the Blocks, where they go). before / after: callables
        making extra components next to a parameter's control (in its row), by parameter name."""
        before, after = before or {}, after or {}
        members = [p for p in self.params if group in self.groups_of(p)]
        rows: contextlib.ExitStack | None = None
        current_row = None
        for p in members:
            if p.row != current_row or not p.row:
                if rows is not None:
                    rows.close()
                    rows = None
                current_row = p.row
                if p.row:
                    rows = contextlib.ExitStack()
                    rows.enter_context(gr.Row(equal_height=True))
            if p.name in before:
                before[p.name]()
            needs = self.needs(self.first_model, p)
            visible = self.place(self.first_model, p) == group and not (
                needs and not self.is_set(needs, self.values.get(needs)))
            if group == p.group:
                self.controls[p.name] = make_control(p, shown_value(p, self.values.get(p.name, p.default)), visible,
                                                     p.elem_id, scale=2)
            else:
                self.mirrors[(p.name, group)] = make_control(
                    p, shown_value(p, self.values.get(p.name, p.default)), visible, f"{p.elem_id}-{group}", scale=2)
            if p.name in after:
                after[p.name]()
        if rows is not None:
            rows.close()

    def control_list(self) -> list[gr.components.Component]:
        """The controls the jobs read, in the form's order."""
        return [self.controls[p.name] for p in self.params]

    def placement_outputs(self) -> list[gr.components.Component]:
        return [*self.control_list(), *self.mirrors.values()]

    def needs(self, model_type: str | None, p: Param) -> str:
        """The parameter p needs set to be shown for model_type ("" for none)."""
        return self.conditions.get(model_type or "", {}).get(p.name) or p.needs

    def needed(self) -> list[str]:
        """The parameters others need set to be shown, in a fixed order."""
        names = {p.needs for p in self.params if p.needs}
        names |= {n for c in self.conditions.values() for n in c.values()}
        return sorted(n for n in names if n in self.controls)

    def is_set(self, name: str, value: Any) -> bool:
        """Whether a needed parameter is set: it holds something other than its default."""
        p = next(p for p in self.params if p.name == name)
        if not has_value(value):
            return False
        if p.kind in (int, float) and not isinstance(value, bool):
            try:
                return float(value) != float(p.default)
            except (TypeError, ValueError):
                return True  # text a number box cannot hold: Generate says what is wrong with it
        return value != p.default

    def placement_inputs(self) -> list[gr.components.Component]:
        """What placement_updates reads after the model type: the needed parameters' controls."""
        return [self.controls[n] for n in self.needed()]

    def placement_updates(self, model_type: str | None, *needed_values: Any) -> list[Any]:
        """Visibility of placement_outputs() for model_type, given the values of placement_inputs() (a
        parameter that needs another one's value is shown only while it has one)."""
        present = {n: self.is_set(n, v) for n, v in zip(self.needed(), needed_values)}
        by_name = {p.name: p for p in self.params}

        def shown(p: Param, group: str) -> bool:
            needs = self.needs(model_type, p)
            return self.place(model_type, p) == group and (not needs or present.get(needs, True))

        out = [gr.update(visible=shown(p, p.group)) for p in self.params]
        out += [gr.update(visible=shown(by_name[name], group)) for name, group in self.mirrors]
        return out

    def placement_io(self, model: gr.components.Component) -> dict[str, Any]:
        """The event arguments that update placement_outputs(); chained (.then) after events that set a needed
        control's value, which fires none of its own events (Gradio 6: "Use as input image", a restore)."""
        return {"fn": self.placement_updates, "inputs": [model, *self.placement_inputs()],
                "outputs": self.placement_outputs(), "queue": False, "show_progress": "hidden",
                "api_visibility": "private"}

    def wire_placement(self, model: gr.components.Component) -> None:
        """Show each control where the chosen model puts it, and while what it needs has a value."""
        io = self.placement_io(model)
        model.change(**io)
        for control in self.placement_inputs():
            # an image editor's upload does not always fire .change (Gradio 6.31): listen to both
            gr.on([getattr(control, e) for e in ("change", "upload", "clear") if hasattr(control, e)], **io)

    def wire_mirrors(self) -> None:
        """Keep each mirror equal to its control, in the browser (no round trip: a click on Generate right
        after a drag sends the new value)."""
        sync = {"fn": None, "js": "(v) => v", "queue": False, "show_progress": "hidden", "api_visibility": "private"}
        for (name, _group), mirror in self.mirrors.items():
            control = self.controls[name]
            control.change(inputs=control, outputs=mirror, **sync)
            mirror.input(inputs=mirror, outputs=control, **sync)


def has_value(value: Any) -> bool:
    """Whether a control holds something: text, a file, an image editor with a picture."""
    if isinstance(value, dict):
        return bool(value.get("background") or value.get("path") or value.get("composite"))
    return value not in (None, "", [])


def placements(model_types: Iterable[str], family_params: Callable[[str], Iterable[str]],
               layout: Callable[[str], Mapping[str, str]], params: Iterable[Param]) -> dict[str, dict[str, str]]:
    """Per model type, where each parameter shows: its handler's layout, else its declared group for the
    parameters its family takes, else hidden."""
    params = list(params)
    out = {}
    for t in model_types:
        own, moved = set(family_params(t)), layout(t)
        out[t] = {p.name: (moved.get(p.name, p.group) if p.name in own else HIDDEN) for p in params}
    return out


__all__ = ["HIDDEN", "ParamForm", "has_value", "make_control", "placements", "shown_value"]
