"""python -m monitor [--host H] [--port P] [--home DIR]: serve the dashboard and API.

Binds 127.0.0.1:8080 by default (config.json monitor.host/port). On a non-loopback address it
refuses to start without a token (monitor.token or TRAINER_MONITOR_TOKEN).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys

from core.config import Config, ConfigError, load_config
from core.logsetup import DailyFileHandler
from core.paths import Layout
from monitor.security import is_loopback_bind
from monitor.services import resolve_token

log = logging.getLogger("monitor")

EXIT_USAGE, EXIT_INSECURE = 2, 2


class _RedactToken(logging.Filter):
    """Access-log lines must not carry ?token=... (EventSource passes it in the URL)."""
    _re = re.compile(r"(token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._re.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        record.msg = self._re.sub(r"\1***", str(record.msg))
        return True


def _setup_logging(layout: Layout, level: str) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level.upper())
    sh = logging.StreamHandler()
    sh.setFormatter(fmt)
    root.addHandler(sh)
    try:
        fh = DailyFileHandler(layout.logs, prefix="monitor")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    except OSError as exc:
        log.warning("no monitor log file in %s: %s", layout.logs, exc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m monitor",
                                description="dashboard and API of the continuous fine-tuning daemon")
    p.add_argument("--host", help="address to bind (default: config monitor.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: config monitor.port, 8080; 0 = any free)")
    p.add_argument("--home", help="base dir (default: $TRAINER_HOME or the repo root)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout.from_env(args.home)
    try:
        cfg = load_config(layout.config)
    except ConfigError as exc:
        print(f"monitor: {exc}\nmonitor: starting with default monitor settings", file=sys.stderr)
        cfg = Config()
    host = args.host or cfg.monitor.host
    port = cfg.monitor.port if args.port is None else args.port
    token = resolve_token(cfg.monitor)
    if not is_loopback_bind(host) and not token:
        print(f"monitor: refusing to listen on {host} without a token: anyone who can reach that "
              "address could read the status and control training. Set monitor.token in config.json "
              "or the environment variable TRAINER_MONITOR_TOKEN, or bind to 127.0.0.1.",
              file=sys.stderr)
        return EXIT_INSECURE
    if token and len(token) < 16:
        print("monitor: warning: the token is shorter than 16 characters", file=sys.stderr)
    if not (0 <= port <= 65535):
        print(f"monitor: bad port {port}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(layout, args.log_level)
    logging.getLogger("uvicorn.access").addFilter(_RedactToken())

    import uvicorn
    from monitor.app import create_app
    app = create_app(layout, cfg, token=token, bind_host=host)
    shown = f"[{host}]" if ":" in host else host
    log.info("monitor on http://%s:%s/ for %s", shown, port, layout.home)
    uvicorn.run(app, host=host, port=port, log_config=None, log_level=args.log_level,
                timeout_graceful_shutdown=2, server_header=False, proxy_headers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
