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

# Before anything imports torch: expandable segments stop the caching allocator from holding memory
# for the differently sized blocks that the low-VRAM profiles stream (H200: 1.6 instead of 2.8 GiB
# reserved while denoising in profile 4, bench/RESULTS.md). A user's own setting wins.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

from app.app_config import ATTENTION_CHOICES, QUANTIZATION_CHOICES

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
log = logging.getLogger("wgp_zimage")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (no usage dump) and exits 2.

    No abbreviations: --lora must never be read as a prefix of --loras.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


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
    for part in ("transformer", "text-encoder"):
        g.add_argument(f"--{part}-quantization", choices=list(QUANTIZATION_CHOICES), default="auto",
                       help=f"{part.replace('-', ' ')} weights to download and load: auto = int8 on cards under "
                            "24 GB, bf16 otherwise")
    g.add_argument("--attention", choices=list(ATTENTION_CHOICES), default="auto",
                   help="attention backend (auto: the fastest installed one that is safe for Z-Image; "
                        "sage can corrupt Base images)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (slower first image, faster steps)")
    g.add_argument("--memory-profile", type=int, choices=range(1, 6), default=4, metavar="N",
                   help="MMGP memory profile on CUDA (default 4): " + "; ".join(
                       f"{n} {d}" for n, d in _profile_descriptions().items()))
    g.add_argument("--perc-reserved-mem-max", type=float, default=0.0, metavar="F",
                   help="cap on pinned RAM as a fraction of RAM (0 = mmgp's default)")
    g.add_argument("--preload", type=int, default=0, metavar="MB",
                   help="MB of the transformer kept in VRAM in the low-VRAM profiles")
    g.add_argument("--overlap-transfers", action="store_true",
                   help="experimental, low-VRAM profiles: copy the next streamed block while the current one "
                        "computes, without mmgp's device sync per block (one more block in VRAM)")
    g.add_argument("--save-quantized", action="store_true",
                   help="write the int8 file of weights quantized on the fly, beside the bf16 one")
    g.add_argument("--loras", type=Path, default=None, metavar="ROOT",
                   help="LoRA root folder (one sub-folder per family: ROOT/z_image); default loras/")
    g.add_argument("--lora-dir-z-image", type=Path, default=None, metavar="DIR",
                   help="Z-Image LoRA folder (default loras/z_image)")
    g.add_argument("--output-format", choices=["png", "jpeg", "webp"], default="png",
                   help="image file format (default png; --output FILE.jpg / .webp picks it by the suffix)")
    g.add_argument("--output-quality", type=int, choices=range(1, 101), default=95, metavar="Q",
                   help="JPEG / WebP quality 1-100 (default 95)")
    g.add_argument("--no-metadata", dest="save_metadata", action="store_false", default=True,
                   help="store no generation settings in the images")
    g.add_argument("--verbose", "-v", action="store_true", help="log details (and tracebacks) to stderr")
    if suppress:
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return p


def _profile_descriptions() -> dict[int, str]:
    from app.offload import PROFILE_DESCRIPTIONS

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
                     help="z_image_base (alias base, default), z_image (alias turbo), z_image_tiny (alias tiny)")
    gen.add_argument("--model-dir", type=Path, default=None,
                     help="weights folder: diffusers layout or the DeepBeepMeep/Z-Image file set")
    gen.add_argument("--transformer", type=Path, default=None,
                     help="single-file transformer (diffusers, DeepBeepMeep or ComfyUI keys) replacing the folder's")
    gen.add_argument("--gen-profile", default=None, metavar="NAME",
                     help="start from a saved generation profile (explicit flags still win)")
    gen.add_argument("--profiles-dir", type=Path, default=Path("profiles"), help="generation profiles folder")
    gen.add_argument("--from-image", type=Path, default=None, metavar="IMAGE",
                     help="re-run the settings stored in an image made by this app (explicit flags still win)")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt")
    src.add_argument("--prompt-file", type=Path, help="one job per non-empty line; lines starting with # are comments")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None, help="denoising steps = model evaluations (1-100)")
    gen.add_argument("--guidance", type=float, default=None, help="CFG scale g (0 = off, 0-20)")
    gen.add_argument("--flow-shift", type=float, default=None, help="sampling shift (1-10; Base 6, Turbo 3)")
    gen.add_argument("--cfg-normalization", type=float, default=None, help="cap |pred| at K * |pos| (0 = off, default)")
    gen.add_argument("--cfg-truncation", type=float, default=None,
                     help="CFG off once 1 - sigma exceeds C (1.0, the default, never truncates)")
    gen.add_argument("--seed", type=int, default=None, help="-1 = random (default; reported)")
    gen.add_argument("--num-images", type=int, default=None,
                     help="images per prompt (1-16, default 1); image i uses seed + i")
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
    try:
        lines = args.prompt_file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror or e}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompt-file {args.prompt_file} holds no prompt")
    return prompts


def image_settings(path: Path) -> dict:
    """The job settings stored in an image by this app (its own seed, one image)."""
    from app.jobs import JobSpec
    from app.metadata import read_settings
    from models.errors import UserError

    try:
        data = read_settings(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    if not data:
        raise UserError(f"{path} holds no wgp-zimage settings")
    keep = JobSpec.from_dict(data).to_dict()
    keep["num_images"] = 1
    return keep


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from app.metadata import read_settings
    from models.errors import UserError

    try:
        data = read_settings(args.image)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {args.image}: {e}") from None
    if not data:
        raise UserError(f"{args.image} holds no wgp-zimage settings")
    print(json.dumps(data, indent=2, ensure_ascii=False))
    return 0


def cli_loras(args: argparse.Namespace) -> list[dict]:
    """--lora / --lora-multipliers as the job's [{name, strength}] (strengths bound by name)."""
    from app.loras import format_schedule, parse_lora_multipliers

    schedules = parse_lora_multipliers(args.lora_multipliers, args.lora)
    return [{"name": name, "strength": format_schedule(schedules[name])} for name in args.lora]


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


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from app.jobs import CLI_NAMES, JobSpec
    from app.service import GenerationService, ServiceConfig
    from models.errors import GenerationInterrupted

    profile: dict = {}
    if args.gen_profile:
        from app.profiles_cli import profile_to_spec_overrides

        profile = profile_to_spec_overrides(args.gen_profile, args.profiles_dir, model_type=args.model)
    if args.from_image:
        profile.update(image_settings(args.from_image))
    prompts = read_prompts(args, profile.get("prompt"))
    service = GenerationService(ServiceConfig.from_args(args))
    model_name = args.model or profile.get("model_type")
    model_type = service.definition(model_name).model_type if model_name else "z_image_base"
    d = {"cfg_normalization": 0.0, "cfg_truncation": 1.0, "seed": -1, "num_images": 1,
         **service.defaults(model_name and model_type, args.model_dir), **profile}
    pick = lambda value, key: d[key] if value is None else value  # explicit flags win over profile and defaults
    specs = [JobSpec(
        model_type=model_type, prompt=p,
        negative_prompt=pick(args.negative_prompt, "negative_prompt"),
        width=pick(args.width, "width"), height=pick(args.height, "height"),
        num_inference_steps=pick(args.steps, "num_inference_steps"),
        guidance_scale=pick(args.guidance, "guidance_scale"), flow_shift=pick(args.flow_shift, "flow_shift"),
        cfg_normalization=pick(args.cfg_normalization, "cfg_normalization"),
        cfg_truncation=pick(args.cfg_truncation, "cfg_truncation"),
        seed=pick(args.seed, "seed"), num_images=pick(args.num_images, "num_images"),
        loras=cli_loras(args) if args.lora else d.get("loras", []),
    ) for p in prompts]
    from app.jobs import validate

    for spec in specs:
        validate(spec, CLI_NAMES)  # all jobs checked before any model loads
    targets = file_targets(args.output, sum(s.num_images for s in specs))
    out_dir = args.output if targets is None and args.output is not None else None

    # first Ctrl-C: stop after the current step; a second one: stop at once
    def on_sigint(signum, frame):
        service.abort.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # os.write, not sys.stderr: the signal may arrive while a progress bar is writing to stderr
        os.write(2, b"\nstopping after the current step (Ctrl-C again to quit at once)\n")

    signal.signal(signal.SIGINT, on_sigint)
    bars: dict[str, tqdm] = {}

    def on_event(ev: dict) -> None:
        if ev["kind"] == "download":
            sys.stderr.write(f"{len(ev['files'])} model file(s) missing in {args.checkpoints_dir}: fetching\n")
        elif ev["kind"] == "load":
            bar = bars.get("load") or bars.setdefault("load", tqdm(total=ev["total"], desc="loading", unit="part"))
            bar.n = ev["step"]
            bar.set_postfix_str(ev["desc"])
            if ev["step"] >= ev["total"]:
                bars.pop("load").close()
        elif ev["kind"] == "step":
            bar = bars.get("steps")
            if bar is None or bar.total != ev["total"] or bar.disable:
                bar = bars["steps"] = tqdm(total=ev["total"], desc="denoising", unit="step")
            bar.update(1)
            bar.set_postfix_str(f"{ev['seconds_per_step']:.2f} s/step")
            if ev["step"] >= ev["total"]:
                bars.pop("steps").close()

    offset = 0
    try:
        for spec in specs:
            names = targets[offset:offset + spec.num_images] if targets else None
            offset += spec.num_images
            result = service.generate(
                spec, model_dir=args.model_dir, transformer_file=args.transformer,
                model_type_given=model_name is not None, output_dir=out_dir, file_names=names,
                on_event=on_event, extra_names=CLI_NAMES, allow_lora_paths=True)
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


def cmd_models(args: argparse.Namespace) -> int:
    from app.service import resolve_device
    from models.registry import handler_for, install_state, load_definitions

    defs, problems = load_definitions()
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    device = resolve_device(args.device)
    for mt, d in sorted(defs.items()):
        handler = handler_for(d.architecture)
        print(f"{mt}  [{handler.family_label}] {d.name}")
        # the same list the web UI's model dropdown reads
        state = install_state(d, args.checkpoints_dir, args.transformer_quantization,
                              args.text_encoder_quantization, device)
        specs, local = state.specs, state.local_transformer
        if not specs and local is None:
            print("    no files to fetch (generated on first use)")
        if local is not None:
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
    quiet_libraries(verbose)


def quiet_libraries(verbose: bool) -> None:
    """Keep third-party chatter (and their progress bars) off the user's terminal unless asked."""
    logging.getLogger("httpx").setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed options; with no sub-command (the web UI) the configuration saved from its Config section
    supplies the defaults, so explicit flags still win. args.config_file names that file then."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        from app.app_config import config_path, load_config, parser_defaults

        # its place is fixed by the flags (or defaults) before the saved ones apply: a saved output
        # folder does not move the file that names it
        config_file = config_path(args.state_dir, args.output_dir)
        saved, warnings = load_config(config_file)
        for w in warnings:
            sys.stderr.write(f"warning: {w}\n")
        if saved:
            parser.set_defaults(**parser_defaults(saved))
            args = parser.parse_args(argv)
        args.config_file = config_file
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    # keep third-party chatter off the user's terminal unless asked
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

        return launch(args)
    except UserError as e:
        log.debug("user error", exc_info=True)
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
