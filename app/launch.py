"""Starting the web UI: its command-line options and `launch(args)`.

The page opens in seconds: no model loads before the first job. The job queue is saved to
`<state-dir>/wgp_zimage_queue.json` (state dir: --state-dir, default the output folder).
Serving beyond this machine (--listen, a non-loopback --server-name, --share) without --auth prints a
warning and shows it at the top of the page; with --auth, failed logins are rate-limited per client
address (app/login_guard.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
from pathlib import Path

from models.errors import UserError

QUEUE_FILE = "wgp_zimage_queue.json"
PROFILES_DIR = Path("profiles")  # generation profiles; `generate` and `profiles` read the same option


def add_launch_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The web UI's own options (--output-dir, --checkpoints-dir... come from shared_options())."""
    g = parser.add_argument_group("web UI")
    g.add_argument("--listen", action="store_true", help="serve on every network interface (0.0.0.0)")
    g.add_argument("--server-name", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    g.add_argument("--server-port", type=int, default=7860, help="port (default 7860)")
    g.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    g.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="ask for this user name and password")
    g.add_argument("--open-browser", action="store_true", help="open the page in the default browser")
    g.add_argument("--profiles-dir", type=Path, default=PROFILES_DIR,
                   help="generation profiles folder (default: profiles/)")
    g.add_argument("--state-dir", type=Path, default=None,
                   help=f"where the job queue is saved as {QUEUE_FILE} (default: the output folder)")
    return parser


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must be USER:PASSWORD (both non-empty)")
    return user, password


def queue_file(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "state_dir", None) or args.output_dir) / QUEUE_FILE


def is_loopback(host: str) -> bool:
    """Whether host is only reachable from this machine (a name other than localhost counts as exposed)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(server_name: str, share: bool, auth: object) -> str:
    """The warning for serving beyond this machine without --auth ("" when there is nothing to warn of)."""
    if auth:
        return ""
    if share:
        return ("Public share link without --auth: anyone with the link can run jobs, read the queue and "
                "change the Config. Restart with --auth USER:PASSWORD.")
    if not is_loopback(server_name):
        return (f"Serving on {server_name} without --auth: anyone who can reach this machine can run jobs, "
                "read the queue and change the Config. Restart with --auth USER:PASSWORD.")
    return ""


def _sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def launch(args: argparse.Namespace) -> int:
    """Build the service, the persisted queue and the page, and serve until Ctrl-C. Returns an exit code."""
    import gradio as gr  # noqa: F401  (fail here, before the model service starts, if it is missing)

    from app.queue import JobQueue
    from app.service import GenerationService, ServiceConfig
    from app.ui import build_ui, launch_options

    port = args.server_port
    if not 1 <= port <= 65535:
        raise UserError(f"--server-port must be 1-65535 (got {port})")
    auth = parse_auth(args.auth)
    from app.app_config import check_output_dir

    # before anything starts: an unusable or too wide output folder is one error line (it is served from)
    check_output_dir(args.output_dir, getattr(args, "state_dir", None) or args.output_dir)
    config = ServiceConfig.from_args(args)
    service = GenerationService(config)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    from app.ray_executor import executor_from_args, shutdown, wants_ray

    executor = executor_from_args(args, service) if wants_ray(args) else None  # Ray: only when asked
    queue = JobQueue(service, queue_file(args), executor=executor).start()
    if threading.current_thread() is threading.main_thread():
        # `kill` / systemd stop: the same clean shutdown as Ctrl-C (the running job is saved as interrupted)
        signal.signal(signal.SIGTERM, _sigterm)
    try:
        from app.app_config import config_path

        config_file = getattr(args, "config_file", None) or config_path(getattr(args, "state_dir", None),
                                                                         args.output_dir)
        server_name = "0.0.0.0" if args.listen else args.server_name
        warning = exposure_warning(server_name, args.share, auth)
        demo = build_ui(queue, service, config, profiles_dir=args.profiles_dir, config_file=config_file,
                        notice=warning)
        print(f"wgp-zimage web UI: images in {config.output_dir}, queue saved in {queue.state_file}", flush=True)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        guard = None
        if auth:
            from app.login_guard import LoginGuard, client_address_middleware

            guard = LoginGuard(*auth)
        try:
            demo.launch(server_name=server_name, server_port=port, share=args.share,
                        auth=guard.check if guard else None,
                        inbrowser=args.open_browser, ssr_mode=False,
                        app_kwargs={"middleware": client_address_middleware()} if guard else None,
                        **launch_options(config.output_dir, private_files=[queue.state_file, config_file]))
        except OSError as e:  # port in use, bad address
            raise UserError(f"cannot serve on {server_name}:{port}: {e}") from None
    except KeyboardInterrupt:
        pass
    finally:
        queue.close()  # a running job stops within one step and is saved as interrupted
        if executor is not None:
            executor.close()
            shutdown()
    return 0
