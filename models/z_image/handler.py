"""The Z-Image family: model types, their defaults, where their weights are, and loading."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from models.errors import UserError
from models.hub_urls import hub_file
from models.registry import FamilyHandler, PreviewFactors, register_handler
from models.z_image import checkpoints as ck
from models.z_image.params import CONDITIONS, DEFAULT_CONTROL_STRENGTH, LAYOUT, LORA_SUBDIR, PARAMS
from models.z_image.pipeline import ZImagePipeline
from models.z_image.text_encoder import MAX_SEQUENCE_LENGTH

log = logging.getLogger("wgp_zimage")

DEFAULT_NEGATIVE = (
    "low quality, worst quality, blurry, pixelated, noisy, artifacts, watermark, text, logo, "
    "bad anatomy, bad hands, extra limbs"
)
# transformer file stem of each type in the DeepBeepMeep/Z-Image file set (TwinFlow: Wan2GP's
# defaults/z_image_twinflow_turbo.json names TwinFlow-Z-Image-Turbo_{bf16,quanto_bf16_int8}.safetensors there;
# it shares Turbo's VAE, scheduler config and Qwen3 text encoder)
TRANSFORMER_STEMS = {"z_image_base": "ZImageBase", "z_image": "ZImageTurbo",
                     "z_image_twinflow_turbo": "TwinFlow-Z-Image-Turbo", "z_image_control": "ZImageTurbo",
                     "z_image_control2": "ZImageTurbo", "z_image_control2_1": "ZImageTurbo"}
# the ControlNet Union architectures: Turbo's transformer plus the ControlNet file their definition's
# "controlnet_URLs" name (bf16 first, then int8), downloaded into the checkpoints folder
TINY_CONTROL = "z_image_tiny_control"  # the tiny model with a tiny ControlNet 2.1 (models/z_image/tiny.py)
CONTROLNET_TYPES = ("z_image_control", "z_image_control2", "z_image_control2_1", TINY_CONTROL)
TINY_TYPES = ("z_image_tiny", TINY_CONTROL)
TINY_FOLDER = "z_image_tiny"
REPO_ID = "DeepBeepMeep/Z-Image"
# Approximate latent -> RGB projection of the Flux VAE (16 channels), which Z-Image uses. These are
# the factors ComfyUI's latent previewer uses for Flux: one matrix product instead of a VAE decode.
LATENT_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)
LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
# files every Base / Turbo install needs besides the transformer and Qwen3 weights
SHARED_FILES = (
    ck.DBM_VAE, ck.DBM_VAE_CONFIG, ck.DBM_SCHEDULER,
    *(f"{ck.DBM_TEXT_DIR}/{n}" for n in ("config.json", "tokenizer.json", "tokenizer_config.json",
                                         "vocab.json", "merges.txt")),
)


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def definition_file(definition, location: str, folder: Path | None) -> Path:
    """Where a file a definition names is: a Hub URL's download in folder (the downloader's path rule,
    models.hub_urls), a local path as given, relative ones from the app's folder (finetunes)."""
    if is_url(location):
        return Path(folder).joinpath(*hub_file(location)[2])
    path = Path(location).expanduser()
    return path if path.is_absolute() else definition.source.parent.parent / path


class ZImageHandler(FamilyHandler):
    family = "z_image"
    family_label = "Z-Image"
    architectures = ("z_image_base", "z_image", "z_image_tiny", "z_image_twinflow_turbo", *CONTROLNET_TYPES)
    aliases = {"base": "z_image_base", "turbo": "z_image", "tiny": "z_image_tiny", "twinflow": "z_image_twinflow_turbo",
               "control": "z_image_control", "control2": "z_image_control2", "control2.1": "z_image_control2_1"}
    # settings carry over between these (the target's recommendations are named where they differ); the 2.x
    # ControlNets take the same control maps and inpaint channels
    equivalences = {"z_image_base": ("z_image",), "z_image": ("z_image_base", "z_image_twinflow_turbo"),
                    "z_image_twinflow_turbo": ("z_image",), "z_image_control2": ("z_image_control2_1",),
                    "z_image_control2_1": ("z_image_control2",)}
    params = PARAMS

    def param_layout(self, architecture: str) -> dict[str, str]:
        return dict(LAYOUT.get(architecture, {}))

    def param_conditions(self, architecture: str) -> dict[str, str]:
        return dict(CONDITIONS.get(architecture, {}))

    def ui_defaults(self, architecture: str) -> dict[str, Any]:
        return {"max_prompt_tokens": MAX_SEQUENCE_LENGTH, **self._defaults(architecture)}

    def job_files(self, values: dict[str, Any], checkpoints_dir: Path) -> list:
        """The depth and pose control types' annotator weights (models/annotators.py)."""
        if not values.get("control_image"):
            return []
        from models.annotators import annotators_for

        return [s for a in annotators_for(values.get("control_type") or "raw") for s in a.specs(checkpoints_dir)]

    def render(self, pipe: Any, architecture: str, **values: Any) -> Any:
        """Image inputs, paste-back and the upscale pass around the sampling (models/z_image/image_job.py);
        TwinFlow samples with its own sampler whatever the job says."""
        from models.z_image.image_job import render

        if architecture == "z_image_twinflow_turbo":  # its inputs were checked where the job came in (check_job)
            values["sampler"] = "twinflow"  # its own sampler, whatever the job's setting says
        return render(pipe, **values)

    def check_job(self, architecture: str, values: dict[str, Any]) -> None:
        """TwinFlow's sampler starts from noise: refused before its 20 GB are fetched, not after they loaded."""
        if architecture == "z_image_twinflow_turbo":
            if values.get("image") or (values.get("upscale") or 1.0) > 1.0:
                raise UserError("TwinFlow Turbo takes no input image and no upscale pass (its sampler starts from "
                                "noise): use Turbo or Base for img2img, inpainting, outpainting and upscaling")
            if values.get("control_image"):
                raise UserError("TwinFlow Turbo takes no control image: use a ControlNet model type")

    def control_map(self, architecture: str, values: dict[str, Any], checkpoints_dir: Path) -> Any:
        """The control map of values' control image at values' render size (what the job encodes)."""
        if architecture not in CONTROLNET_TYPES:
            raise UserError("this model type takes no control image: pick a ControlNet model type")
        if not values.get("control_image"):
            return None
        from models.z_image.control_map import control_map

        return control_map(values["control_image"], values.get("control_type") or "raw", values["width"],
                           values["height"], checkpoints_dir=checkpoints_dir)

    def lora_note(self, architecture: str) -> str | None:
        if architecture == "z_image_twinflow_turbo":
            return ("TwinFlow with LoRAs: they are made for Turbo (or Base); at TwinFlow's 1-4 steps their effect "
                    "may be weaker or blurrier than on Turbo")
        return None

    def latent_preview_factors(self, architecture: str) -> PreviewFactors:
        return LATENT_RGB_FACTORS, LATENT_RGB_BIAS  # every Z-Image type (the tiny one too) has the Flux VAE's space

    def _defaults(self, architecture: str) -> dict[str, Any]:
        if architecture == "z_image":
            return {"width": 1024, "height": 1024, "num_inference_steps": 8, "guidance_scale": 0.0,
                    "flow_shift": 3.0, "negative_prompt": "", "min_recommended_size": 512}
        if architecture == "z_image_twinflow_turbo":  # TwinFlow's release: 2 steps (1-4), no CFG, its own sampler
            return {"width": 1024, "height": 1024, "num_inference_steps": 2, "guidance_scale": 0.0,
                    "flow_shift": 3.0, "negative_prompt": "", "min_recommended_size": 512}
        if architecture == TINY_CONTROL:
            return {**self._defaults("z_image_tiny"), "control_strength": DEFAULT_CONTROL_STRENGTH}
        if architecture in CONTROLNET_TYPES:  # the publishers' (as Wan2GP has them): Turbo without CFG, 9 steps
            return {"width": 1024, "height": 1024, "num_inference_steps": 9, "guidance_scale": 0.0,
                    "flow_shift": 3.0, "negative_prompt": "", "control_strength": DEFAULT_CONTROL_STRENGTH,
                    "min_recommended_size": 512}
        if architecture == "z_image_tiny":
            return {"width": 256, "height": 256, "num_inference_steps": 8, "guidance_scale": 4.0,
                    "flow_shift": 6.0, "negative_prompt": "blurry", "min_recommended_size": 0}
        return {"width": 1024, "height": 1024, "num_inference_steps": 30, "guidance_scale": 4.0,
                "flow_shift": 6.0, "negative_prompt": DEFAULT_NEGATIVE, "min_recommended_size": 512}

    lora_subdir = LORA_SUBDIR
    int8_ready = True
    _tokenizers: dict = {}  # folder -> tokenizer, for live token counts in the UI

    def lora_converter(self):
        from models.z_image.lora import convert_state_dict

        return convert_state_dict

    def default_model_dir(self, architecture: str, checkpoints_dir: Path) -> Path:
        """Where a type's weights live when no --model-dir is given (created for the tiny model)."""
        if architecture in TINY_TYPES:
            from models.z_image.tiny import ensure_tiny_model

            return ensure_tiny_model(Path(checkpoints_dir) / TINY_FOLDER, controlnet=architecture == TINY_CONTROL)
        return Path(checkpoints_dir)

    def model_files(self, model_dir: Path, architecture: str | None) -> ck.ModelFiles:
        stem = TRANSFORMER_STEMS.get(architecture or "z_image_base", "ZImageBase")
        files = ck.find_model_files(model_dir, stem)
        if architecture is None and files.layout == "DeepBeepMeep" and not files.transformer[0].is_file():
            # no --model: take whichever of Base / Turbo the folder holds
            for other in TRANSFORMER_STEMS.values():
                candidate = Path(model_dir) / f"{other}_bf16.safetensors"
                if candidate.is_file():
                    files.missing.remove(files.transformer[0])
                    files.transformer = [candidate]
                    break
        return files

    def files_to_download(
        self, definition, checkpoints_dir: Path, transformer_quantization: str = "bf16",
        text_encoder_quantization: str = "bf16",
    ) -> list:
        """FileSpecs of everything a type needs in the checkpoints folder (none for the tiny model)."""
        from models.downloads import FileSpec, spec_from_url

        if definition.architecture in TINY_TYPES:
            return []
        pick = {"bf16": 0, "int8": 1}
        if text_encoder_quantization not in pick:
            raise UserError(f"the text encoder takes bf16 or int8 weights (got {text_encoder_quantization!r})")
        urls = definition.text_encoder_urls
        if len(urls) <= pick[text_encoder_quantization]:
            raise UserError(f"model definition {definition.source} has no {text_encoder_quantization} text encoder URL")
        # a finetune may name local files instead of URLs
        locations = (definition.transformer_url(transformer_quantization), urls[pick[text_encoder_quantization]])
        specs = [spec_from_url(loc, checkpoints_dir) for loc in locations if is_url(loc)]
        # a ControlNet type's own file, int8 with an int8 transformer (bf16 when the definition lists no int8 one,
        # and with a low-bit transformer)
        control_urls = definition.model.get("controlnet_URLs") or []
        if definition.architecture in CONTROLNET_TYPES and not control_urls and definition.architecture not in \
                TINY_TYPES:
            raise UserError(f"model definition {definition.source} has no controlnet_URLs")
        if control_urls:
            url = control_urls[min(pick.get(transformer_quantization, 0), len(control_urls) - 1)]
            if is_url(url):
                specs.append(spec_from_url(url, checkpoints_dir))
        specs += [FileSpec(REPO_ID, name, Path(checkpoints_dir) / name) for name in SHARED_FILES]
        return specs

    def local_transformer(self, definition, transformer_quantization: str = "bf16",
                          checkpoints_dir: Path | None = None) -> Path | None:
        """The transformer file to load instead of the model folder's own: one a definition names by local path
        (finetunes), or the download of a low-bit format (lowbit_URLs) or of a .gguf URL in checkpoints_dir (the
        folder lookup finds only the type's bf16 / int8 names)."""
        from models.registry import LOWBIT_FORMATS

        if transformer_quantization not in definition.transformer_formats:
            return None  # the tiny model (no files), or a format files_to_download refuses
        location = definition.transformer_url(transformer_quantization)
        if not is_url(location):
            return definition_file(definition, location, checkpoints_dir)
        if checkpoints_dir is not None and (transformer_quantization in LOWBIT_FORMATS
                                            or location.split("?")[0].endswith(".gguf")):
            return definition_file(definition, location, checkpoints_dir)
        return None

    def controlnet_file(self, definition, model_dir: Path, transformer_quantization: str = "bf16") -> Path | None:
        """The ControlNet file a ControlNet type's definition names (its controlnet_URLs' file in the model folder;
        the int8 one with int8 transformer weights when it is there); None for the other types."""
        urls = definition.model.get("controlnet_URLs") or []
        if definition.architecture == TINY_CONTROL or not urls:
            return None
        int8 = definition_file(definition, urls[1], model_dir) if len(urls) > 1 else None
        if transformer_quantization == "int8" and int8 is not None and int8.is_file():
            return int8
        path = definition_file(definition, urls[0], model_dir)
        if not path.is_file():
            raise UserError(f"ControlNet file not found: {path} (it downloads with its model type when no "
                            "--model-dir or --transformer is given; or give --controlnet FILE)")
        return path

    def _controlnet_path(self, model_dir: Path, architecture: str | None, given: str | Path | None) -> Path | None:
        """The ControlNet to load: the one given (a ControlNet type's comes from its definition:
        `controlnet_file`), the tiny control type's own, or none."""
        if given is not None:
            path = Path(given).expanduser()
            if not path.exists():
                raise UserError(f"ControlNet not found: {path}")
            return path
        if architecture == TINY_CONTROL:
            from models.z_image.tiny import CONTROLNET_FOLDER, is_tiny_model, write_tiny_controlnet

            path = model_dir / CONTROLNET_FOLDER
            if not (path / "config.json").is_file():
                if not is_tiny_model(model_dir):
                    raise UserError(f"the tiny ControlNet is not in {path} (the tiny control type takes the tiny "
                                    "model's folder)")
                write_tiny_controlnet(path)
            return path
        if architecture in CONTROLNET_TYPES:
            raise UserError(f"the {architecture} model type needs its ControlNet file (give --controlnet FILE)")
        return None

    def count_tokens(self, model_dir: Path, architecture: str, prompt: str) -> int | None:
        """The prompt's token count with this model's tokenizer; None when its files are not there yet."""
        from models.z_image.text_encoder import count_tokens

        folder = self.model_files(Path(model_dir), architecture).tokenizer_dir
        if not folder.is_dir():
            return None
        key = str(folder)
        if key not in self._tokenizers:
            from transformers import AutoTokenizer

            try:
                self._tokenizers[key] = AutoTokenizer.from_pretrained(key)
            except (OSError, ValueError):
                return None
        return count_tokens(self._tokenizers[key], prompt)

    def scheduler_shift(self, files: ck.ModelFiles) -> float | None:
        if files.scheduler_config is None or not files.scheduler_config.is_file():
            return None
        return ck.scheduler_shift(files.scheduler_config)

    def carry_over_warnings(self, values: dict[str, Any], recommended: dict[str, Any], name: str) -> list[str]:
        """Base settings on Turbo (or the reverse): where guidance, steps and shift stray from name's."""
        warnings = []
        g, rg = values["guidance_scale"], recommended.get("guidance_scale")
        if rg == 0 and g > 0:
            warnings.append(f"guidance {g:g} is above 0: {name} is distilled for guidance 0 (CFG doubles the cost "
                            "of each step)")
        elif rg is not None and rg > 0 and g == 0:
            warnings.append(f"guidance 0 turns CFG and the negative prompt off; {name} recommends {rg:g}")
        steps, rs = values["num_inference_steps"], recommended.get("num_inference_steps")
        if rs and steps > 1.5 * rs:
            warnings.append(f"{steps} steps is many for {name}, which recommends {rs}")
        elif rs and steps < rs / 2:
            warnings.append(f"{steps} steps is few for {name}, which recommends {rs}")
        fs, rf = values["flow_shift"], recommended.get("flow_shift")
        if rf is not None and fs != rf:
            warnings.append(f"flow shift {fs:g} differs from {name}'s recommended {rf:g}")
        return warnings

    def folder_defaults(self, files: ck.ModelFiles) -> dict[str, Any]:
        """Defaults a weights folder's own files give (its scheduler's shift)."""
        shift = self.scheduler_shift(files)
        return {} if shift is None else {"flow_shift": shift}

    def load_model(
        self,
        model_filename: str | Path | None = None,
        base_model_type: str | None = "z_image_base",
        quantizeTransformer: bool = False,  # noqa: N803 - Wan2GP's argument name
        dtype: torch.dtype = torch.bfloat16,
        VAE_dtype: torch.dtype = torch.float32,  # noqa: N803
        model_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        progress=None,
        compile: bool = False,
        transformer_quantization: str = "bf16",
        text_encoder_quantization: str = "bf16",
        save_quantized: bool | str = False,
        attention_backend: str = "sdpa",
        controlnet_file: str | Path | None = None,
        fp8_compute: bool = False,
        int8_layers: str = "quanto",
        **_: Any,
    ) -> tuple[ZImagePipeline, dict[str, Any]]:
        """Load a pipeline and its parts ({transformer, text_encoder, vae}), Wan2GP's shape.

        model_filename: a single-file transformer (diffusers, DeepBeepMeep or ComfyUI keys) that
        replaces the folder's own, a GGUF file or an fp8 safetensors file (models/z_image/lowbit.py: their
        weights stay low-bit; no int8 then); model_dir: any of the supported layouts.
        *_quantization "int8": the quanto int8 file beside the bf16 one when present, else the bf16
        weights quantized on the fly (written back as an int8 file with save_quantized).
        save_quantized: True or "int8" as said; "fp8": bf16 transformer weights are turned into scaled fp8
        ones (used for this run) and written beside the bf16 file (`lowbit.fp8_path`).
        attention_backend: a resolved models.attention backend, held by this model's attention modules.
        controlnet_file: a ControlNet (single file or diffusers folder) for any type; a ControlNet type loads its
        own file from the folder otherwise. The pipeline holds it as `pipe.controlnet` (None without).
        int8_layers: "plain" turns the transformer's quanto int8 layers into models.lowbit.Int8Linear (the same
        int8 data and scales as plain tensors); "quanto" keeps them.
        fp8_compute: fp8 weights' main layers multiply in fp8 (`lowbit.enable_fp8_compute`); the caller has
        checked that the device runs torch._scaled_mm.
        """
        from models.z_image import lowbit
        from models.z_image import quantize as q

        if model_dir is None:
            raise UserError("no model folder given")
        device = torch.device(device)
        files = self.model_files(Path(model_dir), base_model_type)
        if model_filename is not None:
            tf = Path(model_filename)
            if not tf.is_file():
                raise UserError(f"transformer file not found: {tf}")
            files.missing = [p for p in files.missing if p not in files.transformer]
            # the folder's config still serves when the file's tensors fit it (it carries what shapes cannot say)
            folder_config, files.transformer, files.transformer_config = files.transformer_config, [tf], None
        else:
            folder_config = None
        save_format = "int8" if save_quantized is True else (save_quantized or None)
        if save_format not in (None, "int8", "fp8"):
            raise UserError(f"cannot save quantized weights as {save_format!r}: int8 or fp8")
        low = lowbit.lowbit_kind(files.transformer[0]) if len(files.transformer) == 1 else None
        want_int8 = {"transformer": (quantizeTransformer or transformer_quantization == "int8") and low is None
                     and save_format != "fp8",
                     "text encoder": text_encoder_quantization == "int8"}
        if low is not None and (quantizeTransformer or transformer_quantization == "int8"):
            log.info("%s holds %s weights: the transformer is not quantized to int8", files.transformer[0], low)
        if low is not None and save_format == "fp8":
            log.warning("--save-quantized fp8: %s already holds %s weights; no fp8 file written",
                        files.transformer[0], low)
        int8_files = {}
        for part, paths in (("transformer", files.transformer), ("text encoder", files.text_encoder)):
            if part == "transformer" and low is not None:
                continue
            found = paths[0] if paths[0].is_file() and q.is_quanto_file(paths[0]) else (
                q.find_int8(paths[0]) if want_int8[part] and len(paths) == 1 else None)
            if found is not None:
                files.missing = [p for p in files.missing if p != paths[0]]
                int8_files[part] = [found]
        control_path = self._controlnet_path(Path(model_dir), base_model_type, controlnet_file)
        files.check()

        def load_transformer():
            if low == "gguf":
                return lowbit.load_transformer_gguf(files.transformer[0], files.transformer_config, dtype, device,
                                                    folder_config)
            if low == "fp8":
                return lowbit.load_transformer_fp8(files.transformer, files.transformer_config, dtype, device,
                                                   folder_config)
            if "transformer" in int8_files:
                if save_format == "fp8":
                    log.warning("--save-quantized fp8: the transformer comes from the int8 file %s; no fp8 file "
                                "written", int8_files["transformer"][0])
                return q.load_transformer_int8(int8_files["transformer"], files.transformer_config, dtype, device,
                                               folder_config)
            model = ck.load_transformer(files.transformer, files.transformer_config, dtype, device, folder_config)
            if save_format == "fp8":
                lowbit.to_fp8(model)
                log.warning("saved %s", lowbit.save_fp8(model, lowbit.fp8_path(files.transformer[0])))
            elif want_int8["transformer"]:
                q.quantize_on_the_fly(model)
                if save_format:
                    log.warning("saved %s", q.save_quantized(model, q.int8_path(files.transformer[0])))
            return model

        def load_text_encoder():
            if "text encoder" in int8_files:
                return q.load_text_encoder_int8(int8_files["text encoder"], files.text_encoder_config,
                                                files.tokenizer_dir, dtype, device)
            enc = ck.load_text_encoder(files.text_encoder, files.text_encoder_config, files.tokenizer_dir, dtype,
                                       device)
            if want_int8["text encoder"]:
                q.quantize_on_the_fly(enc.model)
                if save_format == "int8":
                    log.warning("saved %s", q.save_quantized(enc.model, q.int8_path(files.text_encoder[0])))
            return enc

        steps = [
            ("transformer", load_transformer),
            ("text encoder", load_text_encoder),
            ("VAE", lambda: ck.load_vae(files.vae, files.vae_config, VAE_dtype, device)),
        ]
        if control_path is not None:
            from models.z_image.controlnet import load_controlnet

            # its blocks match the transformer's dtype: the hints are added to the transformer's stream
            def load_control():
                net = load_controlnet(control_path, parts["transformer"].config, dtype, device)
                if want_int8["transformer"] and not q.is_quantized(net):  # a bf16 file beside int8 weights
                    q.quantize_on_the_fly(net)
                return net

            steps.append(("ControlNet", load_control))
        parts = {}
        for i, (name, load) in enumerate(steps):
            if progress is not None:
                progress(i, len(steps), f"loading {name}")
            parts[name] = load()
        if progress is not None:
            progress(len(steps), len(steps), "loaded")
        net = parts.get("ControlNet")
        if net is not None:
            net.check_transformer(parts["transformer"])  # a width mismatch: said at load time
            # a submodule from here on: the memory profiles stream its blocks with the transformer's, and the
            # attention backend and compile below reach them too
            parts["transformer"].controlnet = net
        parts["transformer"].set_attention_backend(attention_backend)
        if fp8_compute:
            lowbit.enable_fp8_compute(parts["transformer"])
        if int8_layers == "plain":  # quanto's int8 layers (the ControlNet's too) as plain tensors
            from models.lowbit import plain_int8_layers

            log.info("int8 layers as plain tensors: %d", plain_int8_layers(parts["transformer"]))
        elif int8_layers != "quanto":
            raise UserError(f"int8 layers must be quanto or plain (got {int8_layers!r})")
        if compile:
            from models.z_image.transformer import compile_blocks

            compile_blocks(parts["transformer"])  # compiles lazily, at the first step
        shift = self.scheduler_shift(files)
        pipe = ZImagePipeline(parts["transformer"], parts["text encoder"], parts["VAE"],
                              default_shift=shift if shift is not None else 3.0, device=device)
        pipe.controlnet = parts.get("ControlNet")
        return pipe, {"transformer": parts["transformer"], "text_encoder": parts["text encoder"].model,
                      "vae": parts["VAE"]}


HANDLER = register_handler(ZImageHandler())
