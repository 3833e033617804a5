"""Model families and model definitions.

A family is one handler module (`models/<family>/handler.py`) that registers itself; a model type
is one JSON definition in `defaults/` (or `finetunes/`, which override defaults) whose
`model.architecture` names a type its family handles. Nothing outside a handler knows a family's
specifics.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import UserError
from models.params import Param

log = logging.getLogger("wgp_zimage")

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_DIR = ROOT / "defaults"
# a latent -> RGB projection for live previews: (one row of 3 per latent channel, 3 biases)
PreviewFactors = tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]
FINETUNES_DIR = ROOT / "finetunes"
# transformer files a definition may list beside its bf16 / int8 "URLs", by format, in "lowbit_URLs"
LOWBIT_FORMATS = ("fp8", "gguf-q8", "gguf-q4")
TRANSFORMER_FORMATS = ("bf16", "int8", *LOWBIT_FORMATS)


class FamilyHandler:
    """What a model family tells the app. Subclass, fill the fields, call `register_handler`."""

    family: str = ""
    family_label: str = ""
    architectures: tuple[str, ...] = ()
    aliases: dict[str, str] = {}
    # model types whose settings and images load into each other
    equivalences: dict[str, tuple[str, ...]] = {}

    int8_ready: bool = False  # whether load_model can take quanto int8 weights
    # the family's own generation parameters (app/params.py has the common ones); its pipeline
    # receives each under its name
    params: tuple[Param, ...] = ()

    def carry_over_warnings(self, values: dict[str, Any], recommended: dict[str, Any], name: str) -> list[str]:
        """Warnings for settings of an equivalent model type used with this one (recommended: its defaults)."""
        return []

    def folder_defaults(self, files) -> dict[str, Any]:
        """Parameter defaults that a weights folder's own files give (e.g. a scheduler config), by name."""
        return {}

    def param_layout(self, architecture: str) -> dict[str, str]:
        """Where the page shows a parameter for this architecture, when not where it is declared:
        {name: "main" | "advanced" | "hidden"} (hidden ones keep the model's default)."""
        return {}

    def param_conditions(self, architecture: str) -> dict[str, str]:
        """Parameters the page shows for this architecture only while another one is set (differs from its
        default): {name: the other's name}, on top of each declaration's `needs`."""
        return {}

    def ui_defaults(self, architecture: str) -> dict[str, Any]:
        return {}

    def render(self, pipe: Any, architecture: str, **values: Any) -> Any:
        """Run one job's images: values are its pipeline parameters by name plus the service's (seed,
        num_images_per_prompt, callbacks); the result has `images` and `seeds`. A family whose jobs are
        more than one sampling pass (inputs prepared, a refine pass) overrides this. The service also passes
        checkpoints_dir (where weights a job needs besides the model's download, e.g. control-map annotators)
        and on_event (the job's download/progress events); the plain pipeline takes neither."""
        values.pop("checkpoints_dir", None)
        values.pop("on_event", None)
        return pipe(**values)

    def controlnet_file(self, definition: ModelDefinition, model_dir: Path,
                        transformer_quantization: str = "bf16") -> Path | None:
        """A ControlNet weight file the definition's model type loads with its model (None: none)."""
        return None

    def check_job(self, architecture: str, values: dict[str, Any]) -> None:
        """UserError when a job with these (parsed) values cannot run on this architecture; called where the job
        comes in (app.jobs.validate), before its model is fetched or loaded."""

    def control_map(self, architecture: str, values: dict[str, Any], checkpoints_dir: Path) -> Any:
        """The control map a job with these values would use (a PIL image) for the page's preview; None when
        the values name no control image. UserError when this architecture takes none."""
        raise UserError("this model type takes no control image")

    def lora_note(self, architecture: str) -> str | None:
        """A warning for jobs that use LoRAs with this architecture (said once per run of the app)."""
        return None

    def latent_preview_factors(self, architecture: str) -> PreviewFactors | None:
        """The approximate latent -> RGB projection of this architecture's VAE for cheap step previews
        (None: the queue shows the first three latent channels)."""
        return None

    def files_to_download(self, definition: ModelDefinition, checkpoints_dir: Path,
                          transformer_quantization: str = "bf16", text_encoder_quantization: str = "bf16") -> list:
        """FileSpecs (models.downloads) of what a type needs in the checkpoints folder."""
        return []

    def job_files(self, values: dict[str, Any], checkpoints_dir: Path) -> list:
        """FileSpecs of what one job needs besides its model's files (values: its pipeline parameters), fetched
        before the model loads so a missing download fails fast."""
        return []

    lora_subdir: str = ""  # folder under the LoRA root (loras/<lora_subdir>)

    def lora_converter(self):
        """The function turning a LoRA state dict into this family's module deltas (None: no LoRAs)."""
        return None

    def count_tokens(self, model_dir: Path, architecture: str, prompt: str) -> int | None:
        """The prompt's length in tokens for the limit shown in the UI (None: unknown)."""
        return None

    def local_transformer(self, definition: ModelDefinition, transformer_quantization: str = "bf16",
                          checkpoints_dir: Path | None = None) -> Path | None:
        """The transformer file to load instead of the one the model folder holds (a finetune's own file, a
        low-bit download in checkpoints_dir), if any."""
        return None

    def choose_quantization(self, requested: str, device) -> str:
        """bf16 or int8 weights: 'auto' takes int8 on cards under 24 GB, bf16 otherwise (and on the CPU); a
        low-bit transformer format (LOWBIT_FORMATS) is taken as it is."""
        import torch

        if requested in LOWBIT_FORMATS:
            return requested
        if requested not in ("auto", "bf16", "int8"):
            raise UserError(f"quantization must be one of auto, {', '.join(TRANSFORMER_FORMATS)} (got {requested!r})")
        choice = requested
        if requested == "auto":
            small = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < 24 * 1024**3
            choice = "int8" if small else "bf16"
        if choice == "int8" and not self.int8_ready:
            log.warning("int8 weights cannot be loaded yet; using bf16 weights")
            choice = "bf16"
        return choice

    def load_model(self, **kwargs):  # pragma: no cover - each family implements it
        raise NotImplementedError


_HANDLERS: dict[str, FamilyHandler] = {}


def register_handler(handler: FamilyHandler) -> FamilyHandler:
    for arch in handler.architectures:
        other = next((h for h in _HANDLERS.values() if arch in h.architectures and h.family != handler.family), None)
        if other is not None:
            raise ValueError(f"architecture {arch!r} is already handled by family {other.family!r}")
    _HANDLERS[handler.family] = handler
    return handler


def unregister_handler(family: str) -> None:
    _HANDLERS.pop(family, None)


def discover_handlers() -> dict[str, FamilyHandler]:
    """Import every `models/<family>/handler.py`; each registers itself on import."""
    pkg_dir = Path(__file__).resolve().parent
    for info in pkgutil.iter_modules([str(pkg_dir)]):
        if info.ispkg and (pkg_dir / info.name / "handler.py").is_file():
            importlib.import_module(f"models.{info.name}.handler")
    return dict(_HANDLERS)


@functools.cache
def _declaration_modules() -> tuple:
    """Each family's `models/<family>/params.py`: its parameters and names, importable without torch.
    Scanned once: every job spec reads the declarations."""
    pkg_dir = Path(__file__).resolve().parent
    return tuple(importlib.import_module(f"models.{info.name}.params")
                 for info in sorted(pkgutil.iter_modules([str(pkg_dir)]), key=lambda i: i.name)
                 if info.ispkg and (pkg_dir / info.name / "params.py").is_file())


def default_model_type() -> str:
    """The model type used when none is named: the first family's DEFAULT_MODEL_TYPE."""
    for module in _declaration_modules():
        if getattr(module, "DEFAULT_MODEL_TYPE", None):
            return module.DEFAULT_MODEL_TYPE
    raise UserError("no model family declares a default model type")


def model_order() -> list[str]:
    """Model types in the order the page lists them (each family's MODEL_ORDER; the rest follow by name)."""
    return [t for module in _declaration_modules() for t in getattr(module, "MODEL_ORDER", ())]


def lora_subdirs() -> list[str]:
    """Each family's LoRA folder name (loras/<name>; the CLI's --lora-dir-<name> overrides it)."""
    return [m.LORA_SUBDIR for m in _declaration_modules() if getattr(m, "LORA_SUBDIR", None)]


def declared_params() -> list[Param]:
    """Every family's own parameters, from `models/<family>/params.py` (`PARAMS`), without importing
    the handlers (and torch); a name declared by two families is one parameter."""
    out: dict[str, Param] = {}
    for module in _declaration_modules():
        for p in getattr(module, "PARAMS", ()):
            out.setdefault(p.name, p)
    for handler in _HANDLERS.values():  # a handler registered from elsewhere (tests, plugins)
        for p in handler.params:
            out.setdefault(p.name, p)
    return list(out.values())


def check_declared_values(values: dict[str, Any]) -> None:
    """Each family's rules between its parameters (`check_values` of `models/<family>/params.py`), on parsed
    values; UserError names the first broken one."""
    for module in _declaration_modules():
        check = getattr(module, "check_values", None)
        if check is not None:
            check(values)


def handler_for(architecture: str) -> FamilyHandler:
    discover_handlers()
    for h in _HANDLERS.values():
        if architecture in h.architectures:
            return h
    raise UserError(f"no model family handles architecture {architecture!r}")


@dataclass
class ModelDefinition:
    model_type: str
    architecture: str
    name: str
    description: str
    urls: list[str]
    text_encoder_urls: list[str]
    settings: dict[str, Any]
    source: Path
    model: dict[str, Any] = field(default_factory=dict)
    lowbit_urls: dict[str, str] = field(default_factory=dict)  # "lowbit_URLs": {format: URL or local path}

    @property
    def transformer_formats(self) -> tuple[str, ...]:
        """The transformer formats this definition lists files for (bf16, int8: its URLs in that order)."""
        return (*("bf16", "int8")[: len(self.urls)], *(f for f in LOWBIT_FORMATS if f in self.lowbit_urls))

    def transformer_url(self, fmt: str) -> str:
        """The URL (or local path) of the transformer in fmt; a UserError naming the formats it has otherwise."""
        listed = {**dict(zip(("bf16", "int8"), self.urls)), **self.lowbit_urls}
        url = listed.get(fmt)
        if url is None:
            have = ", ".join(self.transformer_formats) or "none"
            raise UserError(f"{self.name} ({self.source.name}) lists no {fmt} transformer (it has: {have}); choose "
                            "one of those as the transformer quantization (Config, --transformer-quantization)")
        return url

    @property
    def short_name(self) -> str:
        """How tight places (the queue table) name it: the definition's "short_name", else its name."""
        return str(self.model.get("short_name") or self.name)

    @property
    def family(self) -> str:
        return handler_for(self.architecture).family

    def defaults(self) -> dict[str, Any]:
        """Handler UI defaults overlaid with the definition's own settings."""
        return {**handler_for(self.architecture).ui_defaults(self.architecture), **self.settings}


def _parse_definition(path: Path) -> ModelDefinition:
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or "architecture" not in model:
        raise ValueError('needs a "model" object with an "architecture"')
    lowbit = model.get("lowbit_URLs", {})
    if not isinstance(lowbit, dict) or not all(k in LOWBIT_FORMATS and isinstance(v, str) for k, v in lowbit.items()):
        raise ValueError(f'"lowbit_URLs" must map formats ({", ".join(LOWBIT_FORMATS)}) to URLs (got {lowbit!r})')
    return ModelDefinition(
        model_type=path.stem,
        architecture=str(model["architecture"]),
        name=str(model.get("name", path.stem)),
        description=str(model.get("description", "")),
        urls=list(model.get("URLs", [])),
        text_encoder_urls=list(model.get("text_encoder_URLs", [])),
        settings={k: v for k, v in data.items() if k != "model"},
        source=path,
        model=model,
        lowbit_urls=dict(lowbit),
    )


def load_definitions(
    dirs: list[Path] | None = None,
) -> tuple[dict[str, ModelDefinition], list[str]]:
    """Definitions by model type (later folders override earlier ones) and a list of problems.

    A broken file is reported and skipped, never fatal; so is one naming an unknown architecture.
    """
    defs, problems = _scan_definitions(dirs)
    for p in problems:
        log.warning(p)
    return defs, problems


def _scan_definitions(dirs: list[Path] | None) -> tuple[dict[str, ModelDefinition], list[str]]:
    handlers = discover_handlers()
    known = {a for h in handlers.values() for a in h.architectures}
    defs: dict[str, ModelDefinition] = {}
    problems: list[str] = []
    for folder in dirs or [DEFAULTS_DIR, FINETUNES_DIR]:
        if not Path(folder).is_dir():
            continue
        for path in sorted(Path(folder).glob("*.json")):
            try:
                d = _parse_definition(path)
            except (OSError, ValueError, TypeError) as e:
                problems.append(f"skipped model definition {path}: {e}")
                continue
            if d.architecture not in known:
                problems.append(f"skipped model definition {path}: unknown architecture {d.architecture!r}")
                continue
            defs[d.model_type] = d
    return defs, problems


def check_job(model_type: str, values: dict[str, Any]) -> None:
    """The family's rules for a job of model_type (FamilyHandler.check_job) on parsed values: UserError names the
    first broken one. An unknown model type passes: it is refused, listing the known ones, where the model is
    chosen."""
    defs, _ = _scan_definitions(None)  # problems are logged where the definitions are loaded, not per job
    d = defs.get(aliases().get(model_type, model_type))
    if d is not None:
        handler_for(d.architecture).check_job(d.architecture, values)


@dataclass
class InstallState:
    """What a model type needs on disk and which of it is missing (the CLI's `models`, the page's model list)."""

    specs: list  # FileSpecs (models.downloads) fetched from the Hub into the checkpoints folder
    missing: list  # those not on disk yet
    local_transformer: Path | None = None  # a finetune's own transformer file, if it names one

    @property
    def installed(self) -> bool:
        return not self.missing and (self.local_transformer is None or self.local_transformer.is_file())


def install_state(definition: ModelDefinition, checkpoints_dir: Path, transformer_quantization: str,
                  text_encoder_quantization: str, device: Any) -> InstallState:
    """The files of definition for these quantization settings (auto|bf16|int8 or a low-bit transformer format,
    decided for device)."""
    from models.downloads import missing_files

    handler = handler_for(definition.architecture)
    tq = handler.choose_quantization(transformer_quantization, device)
    teq = handler.choose_quantization(text_encoder_quantization, device)
    specs = handler.files_to_download(definition, Path(checkpoints_dir), tq, teq)
    return InstallState(specs, missing_files(specs), handler.local_transformer(definition, tq, Path(checkpoints_dir)))


def aliases() -> dict[str, str]:
    return {a: t for h in discover_handlers().values() for a, t in h.aliases.items()}


def resolve_model_type(name: str, defs: dict[str, ModelDefinition]) -> str:
    """A model type from its name or alias; a clear error listing the known ones otherwise."""
    name = aliases().get(name, name)
    if name not in defs:
        known = sorted(set(defs) | set(aliases()))
        raise UserError(f"unknown model type {name!r}; known: {', '.join(known)}")
    return name


def equivalent_types(model_type: str, defs: dict[str, ModelDefinition]) -> tuple[str, ...]:
    """Model types whose settings carry over to model_type (itself included)."""
    arch = defs[model_type].architecture
    eq = handler_for(arch).equivalences.get(arch, ())
    return (arch, *eq)
