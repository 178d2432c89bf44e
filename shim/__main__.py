"""`python -m shim`: the shim with mitmproxy embedded, no mitmdump command line needed.

    python -m shim --upstream http://127.0.0.1:8080 [--config FILE] [--listen HOST:PORT]
    python -m shim uploads [--json] | retry ID | purge ID   [--config FILE]
    python -m shim upload FILE URL [--protocol tus|ietf|content-range]

Without --upstream it also starts the embedded whole-file demo server (shim.demo_server),
which stores what it receives in a folder, so an interrupted upload can be tried at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

from mitmproxy import options
from mitmproxy.tools.dump import DumpMaster

from shim import config as shim_config
from shim.addon import Shim
from shim.demo_server import WholeFileServer

DEFAULT_LISTEN = "127.0.0.1:8000"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", help="the legacy server, e.g. http://127.0.0.1:8080 "
                        "(default: start the embedded demo server)")
    parser.add_argument("--config", default="", help="YAML config file (default: embedded defaults)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    parser.add_argument("--confdir", default="~/.mitmproxy", help="where mitmproxy keeps its CA")
    parser.add_argument("--demo-dir", default="./shim-demo-received",
                        help="where the demo server stores files (only without --upstream)")
    parser.add_argument("--admin", default="", help="HOST:PORT of /healthz, /readyz and "
                        "/metrics, or 'off' (default: the config's admin.listen, "
                        "127.0.0.1:9464)")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="OPTION=VALUE", help="a mitmproxy option, as mitmdump's --set: "
                        "certs=*=cert.pem (a real certificate), ssl_verify_upstream_trusted_ca="
                        "ca.pem, client_certs=..., ssl_insecure=true, keep_host_header=true")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="one line per upload event (created, resumed, taken over, "
                        "completed, delivered, ...): key=value text or JSON")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="do not log every request and connection (upload events, "
                        "warnings and errors still are)")
    return parser.parse_args(argv)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)


def setup_logging(quiet: bool) -> None:
    """What mitmdump does (mitmproxy.tools.main.run): the root logger passes everything to
    mitmproxy's termlog, which filters by its own verbosity option. Quiet also drops the
    proxy's line per connection event (client/server connect, streaming), its warnings kept."""
    logging.getLogger().setLevel(logging.DEBUG)
    for noisy in ("tornado", "asyncio", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet:
        logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING)


def port_taken(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on, or None; checked before anything starts, so a
    busy port is one line and not mitmproxy's advice in its own syntax."""
    if port == 0:
        return None
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


async def serve(args: argparse.Namespace) -> int:
    setup_logging(args.quiet)
    host, port = split_listen(args.listen)
    busy = port_taken(host, port)
    if busy is not None:
        print(f"shim: refusing to start: cannot listen on {args.listen}: {busy}", file=sys.stderr)
        return 2
    demo = None
    upstream = args.upstream
    if not upstream:
        demo = WholeFileServer(Path(args.demo_dir), host="127.0.0.1", port=0)
        demo.start()
        upstream = demo.url
        print(f"demo server storing whole files in {Path(args.demo_dir).resolve()} at {upstream}",
              flush=True)
    opts = options.Options(mode=[f"reverse:{upstream}"], listen_host=host, listen_port=port,
                           confdir=args.confdir)
    master = DumpMaster(opts, with_termlog=True, with_dumper=not args.quiet)
    master.addons.add(Shim())
    try:
        if args.settings:
            master.options.set(*args.settings)
        master.options.update(shim_config=args.config, shim_admin=args.admin,
                              shim_log_format=args.log_format)
    except Exception as exc:  # mitmproxy wraps the config error in OptionsError
        print(f"shim: refusing to start: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, master.shutdown)
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        await master.run()
    finally:
        if demo is not None:
            demo.stop()
    return 0


OPERATOR_COMMANDS = frozenset({"uploads", "retry", "purge"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OPERATOR_COMMANDS:  # on the same store, while the shim serves
        from shim import operator

        return operator.main(argv)
    if argv[:1] == ["upload"]:  # the resumable client, for the far end of a weak link
        from shim import client

        return client.main(argv)
    args = parse_args(argv)
    if args.config:
        try:
            shim_config.load(args.config)
        except shim_config.ConfigError as exc:
            print(f"shim: refusing to start: {exc}", file=sys.stderr)
            return 2
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
