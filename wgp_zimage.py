#!/usr/bin/env python
"""wgp-zimage: Z-Image Base / Turbo from the command line.

    python wgp_zimage.py generate --model tiny --prompt "a fox" --output out.png
    python wgp_zimage.py models
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# Before anything imports torch: expandable segments stop the caching allocator from holding memory
# for the differently sized blocks that the low-VRAM profiles stream (H200: 1.6 instead of 2.8 GiB
# reserved while denoising in profile 4, bench/RESULTS.md). A user's own setting wins.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

from app.app_config import (
    ATTENTION_CHOICES,
    DEFAULT_OUTPUT_QUALITY,
    OUTPUT_QUALITY_RANGE,
    QUANTIZATION_CHOICES,
    TRANSFORMER_QUANTIZATION_CHOICES,
)
from models.parsing import cli_float, cli_int  # ASCII digits only: int('٣') would be 3

if TYPE_CHECKING:  # torch: imported by the commands that need it
    from app.jobs import JobSpec
    from app.service import GenerationService

# tqdm's bar without its rate / remaining time (see on_event in cmd_generate)
STEP_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
log = logging.getLogger("wgp_zimage")


SAVE_QUANTIZED_CHOICES = ("int8", "fp8")
INT8_LAYERS = ("quanto", "plain")  # ServiceConfig.int8_layers
# stands in the --memory-profile help until help is printed: the profiles' table lives beside torch (app.offload)
PROFILES_HELP = "<memory profiles>"


class HelpFormatter(argparse.HelpFormatter):
    """Fills in PROFILES_HELP when help is printed: building the parser must not import torch (2 s)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text and PROFILES_HELP in text:
            table = "; ".join(f"{n} {d}" for n, d in _profile_descriptions().items())
            text = text.replace(PROFILES_HELP, table.replace("%", "%%"))  # argparse %-formats help texts
        return text


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage dump) and exits 2.

    No abbreviations: --lora must never be read as a prefix of --loras.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


class StoreGiven(argparse.Action):
    """store, and mark the option as given (args.<dest>_given): a profile's value applies where it was not."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def was_given(args: argparse.Namespace, dest: str) -> bool:
    """Whether a StoreGiven option was on the command line (its default may equal the value typed)."""
    return getattr(args, f"{dest}_given", False)


def shared_options(suppress: bool = False) -> argparse.ArgumentParser:
    """Options several commands share; accepted after any sub-command and by the UI launch.

    Sub-commands get a copy whose defaults are SUPPRESSed: argparse would otherwise let the
    sub-command's default overwrite a value given before the sub-command name.
    """
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False,
                                argument_default=argparse.SUPPRESS if suppress else None)
    g = p.add_argument_group("shared options")
    g.add_argument("--checkpoints-dir", type=Path, default=Path("ckpts"),
                   help="where model weights are looked up (default: ckpts/)")
    g.add_argument("--output-dir", type=Path, default=Path("outputs"),
                   help="where images are saved (default: outputs/)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="model dtype (default: bf16 on CUDA, fp32 on the CPU)")
    g.add_argument("--vae-dtype", choices=["bf16", "fp32"], default="fp32", help="VAE decode dtype (default fp32)")
    g.add_argument("--vae-tiling", action="store_true", help="decode the image in tiles (large images, small cards)")
    for part, choices in (("transformer", TRANSFORMER_QUANTIZATION_CHOICES), ("text-encoder", QUANTIZATION_CHOICES)):
        g.add_argument(f"--{part}-quantization", choices=list(choices), default="auto",
                       help=f"{part.replace('-', ' ')} weights to download and load: auto = int8 on cards under "
                            "24 GB, bf16 otherwise" + ("; fp8, gguf-q8, gguf-q4: the low-bit file the model "
                                                       "definition lists (`models` shows its formats)"
                                                       if part == "transformer" else ""))
    g.add_argument("--attention", choices=list(ATTENTION_CHOICES), default="auto",
                   help="attention backend (auto: the fastest installed one that is safe for Z-Image; "
                        "sage can corrupt Base images)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (slower first image, faster steps)")
    g.add_argument("--memory-profile", type=cli_int, choices=range(1, 6), default=4, metavar="N",
                   help=f"MMGP memory profile on CUDA (default 4): {PROFILES_HELP}")
    g.add_argument("--perc-reserved-mem-max", type=cli_float, default=0.0, metavar="F",
                   help="cap on pinned RAM as a fraction of RAM (0 = mmgp's default)")
    g.add_argument("--preload", type=cli_int, default=0, metavar="MB",
                   help="MB of the transformer kept in VRAM in the low-VRAM profiles")
    g.add_argument("--overlap-transfers", action=argparse.BooleanOptionalAction, default=True,
                   help="low-VRAM profiles (2, 4, 5): copy the next streamed block while the current one "
                        "computes, without mmgp's device sync per block (one more block in VRAM; default on, "
                        "same images; --no-overlap-transfers: mmgp's own streaming)")
    g.add_argument("--fp8-compute", action=argparse.BooleanOptionalAction, default=None,
                   help="fp8 weights (an fp8 --transformer file, --save-quantized fp8): the main layers' matrix "
                        "products in fp8 (torch._scaled_mm, activations scaled per token); default: on where the "
                        "CUDA GPU has compute capability 8.9+ (Ada, Hopper); --fp8-compute asks for it on any "
                        "device that runs it (one warning and per-layer dequantization where none does)")
    g.add_argument("--int8-layers", choices=list(INT8_LAYERS), default="quanto",
                   help="int8 transformer weights as quanto's layers (quanto, default) or as plain int8 tensors "
                        "and per-row scales (plain: the same products, which --compile traces with the matmul)")
    g.add_argument("--save-quantized", nargs="?", const="int8", choices=list(SAVE_QUANTIZED_CHOICES), default=False,
                   metavar="int8|fp8",
                   help="write the int8 file of weights quantized on the fly, beside the bf16 one; fp8: turn the "
                        "bf16 transformer into scaled fp8 and write that file (use it with --transformer)")
    g.add_argument("--loras", type=Path, default=None, metavar="ROOT",
                   help="LoRA root folder (one sub-folder per family: ROOT/z_image); default loras/")
    from models.registry import lora_subdirs

    for sub in lora_subdirs():  # one per family: its LoRA folder itself
        g.add_argument(f"--lora-dir-{sub.replace('_', '-')}", type=Path, default=None, metavar="DIR",
                       help=f"this family's LoRA folder (default loras/{sub})")
    g.add_argument("--output-format", choices=["png", "jpeg", "webp"], default="png", action=StoreGiven,
                   help="image file format (default png; --output FILE.jpg / .webp picks it by the suffix)")
    g.add_argument("--output-quality", type=cli_quality, default=DEFAULT_OUTPUT_QUALITY, metavar="Q", action=StoreGiven,
                   help=f"JPEG / WebP quality {'-'.join(map(str, OUTPUT_QUALITY_RANGE))} "
                        f"(default {DEFAULT_OUTPUT_QUALITY})")
    g.add_argument("--no-metadata", dest="save_metadata", action="store_false", default=True,
                   help="store no generation settings in the images")
    ray = g.add_mutually_exclusive_group()
    ray.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                     help="run jobs on the Ray cluster there (one worker per GPU; pip install -r requirements-ray.txt)")
    ray.add_argument("--ray-local", action="store_true", default=False,
                     help="start Ray on this machine and run jobs on it (one worker per visible GPU)")
    g.add_argument("--ray-workers", type=cli_int, default=None, metavar="N",
                   help="with --ray-*: N workers (default: one per GPU of the cluster; without GPUs one CPU worker)")
    g.add_argument("--verbose", "-v", action="store_true", help="log details (and tracebacks) to stderr")
    if suppress:
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return p


def cli_quality(text: str) -> int:
    """argparse type of --output-quality: a range check (choices=range(...) printed all 100 values)."""
    value = cli_int(text)
    lo, hi = OUTPUT_QUALITY_RANGE
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"must be between {lo} and {hi} (got {value})")
    return value


cli_quality.__name__ = "int"  # argparse names the type by __name__ ("invalid int value")


def _profile_descriptions() -> dict[int, str]:
    from app.memory_profiles import PROFILE_DESCRIPTIONS

    return dict(PROFILE_DESCRIPTIONS)


def build_parser() -> Parser:
    from app.launch import add_launch_options

    parser = Parser(prog="wgp_zimage.py", description="Z-Image Base / Turbo text-to-image: with no command, "
                    "the web UI", parents=[shared_options()])
    add_launch_options(parser)
    shared = shared_options(suppress=True)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)

    gen = sub.add_parser("generate", parents=[shared], help="render images headlessly")
    gen.add_argument("--model", default=None,
                     help="model type or alias (`wgp_zimage.py models` lists them; default: the first family's "
                          "default type)")
    gen.add_argument("--model-dir", type=Path, default=None,
                     help="weights folder: diffusers layout or the DeepBeepMeep/Z-Image file set")
    gen.add_argument("--transformer", type=Path, default=None,
                     help="single-file transformer (diffusers, DeepBeepMeep or ComfyUI keys) replacing the folder's")
    gen.add_argument("--controlnet", type=Path, default=None, metavar="PATH",
                     help="Z-Image ControlNet Union (1.0 / 2.0 / 2.1: the published single file or a diffusers "
                          "folder) loaded with the model, for --control-image (ControlNet model types have their own)")
    gen.add_argument("--gen-profile", default=None, metavar="NAME",
                     help="start from a saved generation profile (explicit flags still win)")
    gen.add_argument("--profiles-dir", type=Path, default=argparse.SUPPRESS,  # the top level's default
                     help="generation profiles folder (default: profiles/)")
    gen.add_argument("--from-image", type=Path, default=None, metavar="IMAGE",
                     help="re-run the settings stored in an image made by this app (explicit flags still win)")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt")
    src.add_argument("--prompt-file", type=Path, help="one job per non-empty line; lines starting with # are comments")
    from app.params import add_generate_options

    add_generate_options(gen)  # one option per declared generation parameter (app/params.py)
    gen.add_argument("--lora", action="append", default=None, metavar="PATH_OR_NAME",
                     help="apply a LoRA (a file, or a name in the LoRA folder); repeatable")
    gen.add_argument("--lora-multipliers", default=None, metavar="SPEC",
                     help='strengths in --lora order, space-separated; a comma list is spread over the steps: '
                          '"1.0 0.6,0.3"')
    gen.add_argument("--output", type=Path, default=None,
                     help="FILE.png (K images: FILE_1.png ... FILE_K.png) or a folder (default: --output-dir)")

    sub.add_parser("models", parents=[shared], help="list model types and whether their files are present")
    info = sub.add_parser("info", parents=[shared], help="print the generation settings stored in an image")
    info.add_argument("image", type=Path)
    from app.profiles_cli import add_profiles_parser

    add_profiles_parser(sub, shared)
    return parser


def read_prompts(args: argparse.Namespace, profile_prompt: str | None = None) -> list[str]:
    from models.errors import UserError

    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file is None:
        if profile_prompt:
            return [profile_prompt]
        raise UserError("give --prompt or --prompt-file (or a --gen-profile that holds a prompt)")
    try:  # not app.untrusted.read_text: the user's own file, and <(command) pipes are welcome
        data = args.prompt_file.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read --prompt-file {args.prompt_file}: {_why(e)}") from None
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start}); save it as UTF-8") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompt-file {args.prompt_file} holds no prompt")
    return prompts


def _why(e: Exception) -> str:
    """An error's reason without Python's "[Errno N]" and repr noise."""
    return getattr(e, "strerror", None) or str(e)


def _read_image_settings(path: Path) -> dict:
    from app.metadata import read_settings
    from models.errors import UserError

    try:
        data = read_settings(path)
    except (OSError, ValueError) as e:  # MetadataError is both; its message names no path
        raise UserError(f"cannot read image {path}: {_why(e)}") from None
    if not data:
        raise UserError(f"{path} holds no wgp-zimage settings")
    return data


def image_settings(path: Path) -> dict:
    """The job settings stored in an image by this app (its own seed, one image), each value's type checked:
    the image may come from anywhere."""
    from app.metadata import MetadataError, job_settings
    from models.errors import UserError

    try:
        return job_settings(_read_image_settings(path))
    except MetadataError as e:
        raise UserError(f"cannot use image {path}: {e}") from None


def cmd_info(args: argparse.Namespace) -> int:
    import json

    text = json.dumps(_read_image_settings(args.image), indent=2, ensure_ascii=False)
    try:
        print(text)
    except UnicodeEncodeError:  # a terminal that cannot show the prompt's characters: escape them
        print(json.dumps(json.loads(text), indent=2, ensure_ascii=True))
    return 0


def cli_loras(args: argparse.Namespace, library) -> list[dict]:
    """--lora / --lora-multipliers as the job's [{name, strength}] (strengths bound by name). A file of the LoRA
    folder (library) is named as the folder names it, so its images re-run with --from-image; a file elsewhere
    by its absolute path, which the images' metadata stores as the file's stem (app.metadata.stored_settings)."""
    from app.loras import format_schedule, parse_lora_multipliers

    schedules = parse_lora_multipliers(args.lora_multipliers, args.lora)
    return [{"name": lora_name(arg, library), "strength": format_schedule(schedules[arg])} for arg in args.lora]


def lora_name(arg: str, library) -> str:
    """The job's name for a --lora argument: a LoRA folder's name as it is, a file by its folder name when
    inside the folder, else by its absolute path (a missing one as given: check_loras names it)."""
    if arg in library.names():
        return arg
    path = Path(arg).expanduser()
    if not path.is_file():
        return arg
    path = path.resolve()
    return next((item.name for item in library.items if item.path.resolve() == path), str(path))


def check_output_folder(folder: Path, flag: str) -> None:
    """UserError unless images can be written in folder (made when the first image is saved), checked
    before any model loads rather than after the whole job has run."""
    from app.outputs import output_folder_problem
    from models.errors import UserError

    problem = output_folder_problem(folder)
    if problem:
        raise UserError(f"{flag} {folder}: {problem}")


def check_loras(service: GenerationService, specs: list[JobSpec], allow_paths: bool) -> None:
    """Every job's LoRAs resolve (UserError naming the first that does not), before any model loads."""
    from models.errors import UserError

    for spec in specs:
        library = service.lora_library(spec.model_type)
        for item in spec.loras:
            try:
                library.resolve(item["name"], allow_paths=allow_paths)
            except UserError as e:
                if allow_paths:
                    raise
                raise UserError(f"{e} (LoRAs from --from-image or --gen-profile are names in the LoRA folder; "
                                "only --lora takes a file path)") from None


def file_targets(output: Path | None, total: int) -> list[Path] | None:
    """Explicit file names for --output FILE (None means: name files in a folder)."""
    if output is None or output.is_dir() or not output.suffix:
        return None
    if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        from models.errors import UserError

        raise UserError(f"--output {output}: use a .png, .jpg or .webp file name, or a folder")
    if total == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(1, total + 1)]


def apply_profile_output(args: argparse.Namespace, profile: dict) -> None:
    """A generation profile's image format and quality, unless --output-format / --output-quality (or, for the
    format, an --output file name's suffix) say otherwise."""
    named_file = args.output is not None and bool(args.output.suffix) and not args.output.is_dir()
    if profile.get("output_format") and not was_given(args, "output_format") and not named_file:
        args.output_format = profile["output_format"]
    if profile.get("output_quality") and not was_given(args, "output_quality"):
        args.output_quality = profile["output_quality"]


def cmd_generate(args: argparse.Namespace) -> int:
    from app.jobs import JobSpec, cap_texts, input_render_size, validate
    from app.params import DEFAULT_MODEL_TYPE, by_name, cli_values
    from models.errors import GenerationInterrupted, UserError

    if args.lora_multipliers is not None and not args.lora:
        raise UserError("--lora-multipliers gives the strengths of --lora LoRAs: give --lora too")
    profile: dict = {}
    if args.gen_profile:
        from app.profiles_cli import profile_to_spec_overrides

        profile = profile_to_spec_overrides(args.gen_profile, args.profiles_dir, model_type=args.model)
        apply_profile_output(args, profile)
    if args.from_image:
        profile.update(image_settings(args.from_image))
    prompts = read_prompts(args, profile.get("prompt"))
    from tqdm import tqdm

    from app.service import GenerationService, ServiceConfig  # torch: only once the inputs are read

    service = GenerationService(ServiceConfig.from_args(args))
    model_name = args.model or profile.get("model_type")
    model_type = service.definition(model_name).model_type if model_name else DEFAULT_MODEL_TYPE
    # explicit flags win over the profile / image, which win over the model's defaults
    given = {**profile, **cli_values(args)}
    values = {**service.defaults(model_name and model_type, args.model_dir), **given}
    declared = by_name()
    image = next((p for p in declared.values() if p.widget == "image" and values.get(p.name)), None)
    if image is not None and ("width" not in given or "height" not in given):  # the input image gives the size
        values["width"], values["height"] = input_render_size(
            image.parse(values[image.name]), *(declared[k].parse(given[k]) if k in given else None
                                              for k in ("width", "height")))
    loras = cli_loras(args, service.lora_library(model_type)) if args.lora else values.get("loras", [])
    specs = [JobSpec(model_type=model_type, prompt=p, loras=loras,
                     **{k: v for k, v in values.items() if k in declared and k != "prompt"}) for p in prompts]
    for spec in specs:  # all jobs checked before any model loads, with the page's messages
        for w in cap_texts(spec):
            log.warning(w)
        validate(spec)
    # --lora may name a file anywhere (the user's own command line); LoRAs that come from an image's
    # settings or a profile file are untrusted: names in the LoRA folder only, as in the web UI
    lora_paths = bool(args.lora)
    check_loras(service, specs, lora_paths)
    targets = file_targets(args.output, sum(s.num_images for s in specs))
    out_dir = args.output if targets is None and args.output is not None else None
    if targets:
        check_output_folder(targets[0].parent, "--output")
    else:
        check_output_folder(out_dir or service.config.output_dir, "--output" if out_dir else "--output-dir")

    from app.ray_executor import wants_ray

    if wants_ray(args):
        return generate_on_ray(args, service, specs, out_dir, targets)

    from app.cancel import CancelToken

    # first Ctrl-C: stop the current job after its current step; a second one: stop at once
    current = [CancelToken()]  # the running job's token (a list: the handler reads the latest)
    bars: dict[str, tqdm] = {}
    stopping: list[bool] = []  # after a Ctrl-C: no bar is drawn again under the message

    def on_sigint(signum, frame):
        current[0].cancel()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stopping.append(True)
        # the bars end where they are and are never drawn again (on_event skips them), so the message keeps its
        # own line. Not bar.close(): the signal may arrive inside a bar's write to stderr, and writing to it
        # again from here raises "reentrant call"; hence os.write for the message too
        for bar in bars.values():
            bar.disable = True
        bars.clear()
        os.write(2, b"\nstopping after the current step (Ctrl-C again to quit at once)\n")

    signal.signal(signal.SIGINT, on_sigint)
    running: list = [None]  # the job whose events these are

    def on_event(ev: dict) -> None:
        if stopping and ev["kind"] in ("load", "preprocess", "step"):
            return
        if ev["kind"] == "download":
            sys.stderr.write(f"{len(ev['files'])} model file(s) missing in {args.checkpoints_dir}: fetching\n")
        elif ev["kind"] == "load":
            bar = bars.get("load") or bars.setdefault("load", tqdm(total=ev["total"], desc="loading", unit="part"))
            bar.n = ev["step"]
            bar.set_postfix_str(ev["desc"])
            if ev["step"] >= ev["total"]:
                bars.pop("load").close()
        elif ev["kind"] == "preprocess":  # a control map made by an annotator model (depth, pose)
            bar = bars.get("prep") or bars.setdefault("prep", tqdm(total=ev["total"], desc="control map",
                                                                    unit="part"))
            bar.n = ev["step"]
            bar.set_postfix_str(ev["desc"])
            if ev["step"] >= ev["total"]:
                bars.pop("prep").close()
        elif ev["kind"] == "step":
            bar = bars.get("steps")
            if bar is None or bar.total != ev["total"] or bar.disable:
                # the bar starts at the first step's event, so tqdm's own rate and ETA would measure that step
                # from microseconds ago ("76260 step/s"): ours come from the pipeline's step times
                # Heun evaluates the model twice a step (the last step once): the time per step says so too
                heun = getattr(running[0], "sampler", "euler") == "heun"
                bar = bars["steps"] = tqdm(total=ev["total"], desc="denoising (heun: 2 evaluations a step)" if heun
                                           else "denoising", unit="step", bar_format=STEP_BAR)
            bar.update(1)
            bar.set_postfix_str(f"{ev['seconds_per_step']:.2f} s/step, ETA {tqdm.format_interval(ev['eta'])}")
            if ev["step"] >= ev["total"]:
                bars.pop("steps").close()

    quiet_libraries(args.verbose)  # every check passed: models load next
    offset = 0
    try:
        for spec in specs:
            running[0] = spec
            names = targets[offset:offset + spec.num_images] if targets else None
            offset += spec.num_images
            if not current[0].is_cancelled():  # a Ctrl-C between two jobs stops the next one at its start
                current[0] = CancelToken()
            result = service.generate(
                spec, model_dir=args.model_dir, transformer_file=args.transformer, controlnet_file=args.controlnet,
                model_type_given=model_name is not None, output_dir=out_dir, file_names=names,
                on_event=on_event, allow_lora_paths=lora_paths, cancel=current[0])
            for line in result.lora_reports:
                print(line)
            for path, seed in zip(result.paths, result.seeds):
                print(f"saved {path} (seed {seed})")
            print(f"{result.seconds:.1f} s, {result.seconds_per_step:.3f} s/step")
    except GenerationInterrupted:
        sys.stderr.write("interrupted: the current job was stopped and nothing of it was written\n")
        return EXIT_INTERRUPTED
    finally:
        for bar in bars.values():
            bar.close()
    return 0


def generate_on_ray(args: argparse.Namespace, service, specs: list, out_dir: Path | None,
                    targets: list[Path] | None) -> int:
    """`generate --ray-*`: the jobs (one per prompt line) go through an in-memory queue to the Ray workers,
    side by side; each job's files are written here, named as without Ray."""
    from tqdm import tqdm

    from app.queue import FINISHED, JobQueue
    from app.ray_executor import executor_from_args, shutdown
    from models.errors import UserError

    for flag, value in (("--model-dir", args.model_dir), ("--transformer", args.transformer),
                        ("--controlnet", args.controlnet), ("--output FILE", targets)):
        if value:
            raise UserError(f"{flag} does not go with --ray-local / --ray-address (the workers use the model "
                            "types' own files)")
    if args.lora:  # the workers get LoRAs of the LoRA folder, by name
        check_loras(service, specs, False)
    if out_dir is not None:
        service.config.output_dir = out_dir
    executor = executor_from_args(args, service)
    try:
        queue = JobQueue(service, None, executor=executor)
        ids = queue.submit_many(specs)
        executor.start_all()  # the lines spread over all the workers, not over the first one up
        queue.start()
        stopping: list[bool] = []

        def stop(*_: object) -> None:  # Ctrl-C: the running jobs stop within a step, the waiting ones end
            if stopping:  # a second Ctrl-C quits at once
                raise KeyboardInterrupt
            stopping.append(True)
            queue.abort_waiting()
            queue.abort()
            sys.stderr.write("stopping (Ctrl-C again to quit at once)\n")

        signal.signal(signal.SIGINT, stop)
        with tqdm(total=len(ids), desc=f"jobs on {len(executor.slot_names())} Ray workers", unit="job") as bar:
            while True:
                done = sum(queue.get(i)["status"] in FINISHED for i in ids)
                bar.update(done - bar.n)
                if done == len(ids):
                    break
                try:  # jobs may wait long for a worker (none free, a GPU busy): the bar just waits on
                    queue.wait_until(lambda q, n=done: sum(q.get(i)["status"] in FINISHED for i in ids) > n, 60)
                except TimeoutError:
                    continue
        queue.close()
    finally:
        executor.close()
        shutdown()
    failed = 0
    for job_id in ids:
        job = queue.get(job_id)
        for line in job["lora_reports"]:
            print(line)
        for path, seed in zip(job["paths"], job["seeds"]):
            print(f"saved {path} (seed {seed}, on {job['worker']})")
        if job["status"] != "done":
            failed += 1
            sys.stderr.write(f"job {job_id} ({job['spec']['prompt'][:40]!r}) {job['status']}: {job['error']}\n")
    if any(queue.get(i)["status"] == "aborted" for i in ids):
        return EXIT_INTERRUPTED
    return 1 if failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from app.service import resolve_device
    from models.errors import UserError
    from models.registry import handler_for, install_state, load_definitions

    defs, problems = load_definitions()
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    device = resolve_device(args.device)
    for mt, d in sorted(defs.items()):
        handler = handler_for(d.architecture)
        print(f"{mt}  [{handler.family_label}] {d.name}")
        if d.transformer_formats:
            print(f"    transformer formats: {', '.join(d.transformer_formats)}")
        # the same list the web UI's model dropdown reads
        try:
            state = install_state(d, args.checkpoints_dir, args.transformer_quantization,
                                  args.text_encoder_quantization, device)
        except UserError as e:  # a format this type does not list
            print(f"    cannot be used: {e}")
            continue
        specs, local = state.specs, state.local_transformer
        if not specs and local is None:
            print("    no files to fetch (generated on first use)")
        if local is not None and local not in {spec.local_path for spec in specs}:  # a download is listed below
            print(f"    [{'x' if local.is_file() else ' '}] {local}")
        for spec in specs:
            print(f"    [{'x' if spec.local_path.is_file() else ' '}] {spec.local_path}  <- {spec.url()}")
    return 0


class _LowerLevel(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def setup_logging(verbose: bool) -> None:
    """Our messages to the current stderr as 'warning: ...' lines (once, even if main runs again)."""
    logger = logging.getLogger("wgp_zimage")
    for h in [h for h in logger.handlers if getattr(h, "_wgp", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._wgp = True  # type: ignore[attr-defined]
    handler.setFormatter(_LowerLevel())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.INFO if verbose else logging.WARNING)


def quiet_libraries(verbose: bool) -> None:
    """Keep diffusers' and transformers' chatter (and their progress bars) off the user's terminal unless asked.

    Called just before models load, not at start: importing the two costs ~1 s (diffusers pulls in
    torch._dynamo), which `info`, `profiles` or a refused `generate` never need.
    """
    if verbose:
        return
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def _bare_save_quantized(argv: list[str]) -> list[str]:
    """A bare `--save-quantized` (int8) followed by anything but a format (a sub-command name, a prompt...)
    written `--save-quantized=int8`: argparse would take that next word for the optional format."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--":
            break
        if arg == "--save-quantized" and out[i + 1] not in SAVE_QUANTIZED_CHOICES and not out[i + 1].startswith("-"):
            out[i] = "--save-quantized=int8"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed options; with no sub-command (the web UI) the configuration saved from its Config section
    supplies the defaults, so explicit flags still win. args.config_file names that file then."""
    parser = build_parser()
    argv = _bare_save_quantized(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        from app.app_config import config_path, load_config, parser_defaults

        # its place is fixed by the flags (or defaults) before the saved ones apply: a saved output
        # folder does not move the file that names it
        config_file = config_path(args.state_dir, args.output_dir)
        saved, warnings = load_config(config_file)
        for w in warnings:
            sys.stderr.write(f"warning: {w}\n")
        state_dir = args.state_dir or args.output_dir
        if saved:
            parser.set_defaults(**parser_defaults(saved))
            args = parser.parse_args(argv)
        args.config_file = config_file
        # the queue lives beside the config: a saved output folder moves the images, not the jobs
        args.state_dir = args.state_dir or state_dir
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from models.errors import UserError

    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "profiles":
            from app.profiles_cli import run_profiles

            return run_profiles(args)
        from app.launch import launch

        quiet_libraries(args.verbose)  # the UI's jobs load models
        return launch(args)
    except UserError as e:
        log.debug("user error", exc_info=True)
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    except OSError as e:  # a full disk, a folder made read-only meanwhile: one line, not a traceback
        log.debug("system error", exc_info=True)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        sys.stderr.write(f"error: {_why(e)}{where}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
