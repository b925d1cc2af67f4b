"""The monitor's FastAPI app: read-only views of the daemon's files, control requests, the dashboard.

It never imports torch or the trainer: it reads status/, state.db and logs/, and writes control
requests (and staged uploads in inbox/) exactly like trainer-ctl.
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from core.config import Config, MonitorConfig
from core.diskfull import describe as describe_disk, is_disk_full
from core.paths import REPO_ROOT, Layout
from monitor import api_schema, routes_control, routes_eval, routes_events, routes_metrics, routes_queue, \
    routes_samples, routes_status, routes_system
from monitor.security import API_NOT_FOUND, MAX_BODY_BYTES, UPLOAD_PATHS, SecurityMiddleware
from monitor.services import Services, resolve_token

log = logging.getLogger("monitor")

WEB_DIR = REPO_ROOT / "web"


def create_app(layout: Layout, config: Config | MonitorConfig | None = None, *,
               token: str | None = None, bind_host: str | None = None, web_dir: Path | None = None,
               sample_interval_s: float = 2.0) -> FastAPI:
    """The app for one base dir. *token* defaults to TRAINER_MONITOR_TOKEN or monitor.token."""
    if isinstance(config, Config):
        mon = config.monitor
    elif isinstance(config, MonitorConfig):
        mon = config
    else:
        mon = MonitorConfig()
    token = token if token is not None else resolve_token(mon)
    svc = Services(layout=layout, monitor=mon, token=token, bind_host=bind_host,
                   sample_interval_s=sample_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.sampler.start()
        log.info("monitor for %s ready (token %s)", layout.home, "required" if token else "not set")
        try:
            yield
        finally:
            svc.sampler.stop()

    app = FastAPI(title="Continuous trainer monitor",
                  description="Live status, history, queue and control of the continuous QLoRA "
                              "fine-tuning daemon. Every change needs the header "
                              "`X-Trainer-Request: 1`.",
                  version="1.0", lifespan=lifespan)
    app.state.services = svc

    # a full disk (an upload, a control request) is 507 Insufficient Storage with the free space,
    # never a 500 with a traceback
    async def disk_full(request: Request, exc: Exception) -> JSONResponse:
        if not is_disk_full(exc):
            raise exc
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": f"{describe_disk(layout.home)}: {getattr(exc, 'strerror', None) or exc}; "
                                       "nothing was queued or changed"}, status_code=507)
    app.add_exception_handler(OSError, disk_full)
    app.add_exception_handler(sqlite3.Error, disk_full)
    for module in (routes_status, routes_queue, routes_control, routes_metrics, routes_system,
                   routes_eval, routes_samples, routes_events):
        app.include_router(module.router)

    # the seed system's URLs keep working
    @app.get("/live_monitor_ui_v2.html", include_in_schema=False)
    def legacy_dashboard(request: Request) -> RedirectResponse:
        return RedirectResponse(_with_query("/", request), status_code=301)

    @app.get("/layer_activity_monitor.html", include_in_schema=False)
    def legacy_layers(request: Request) -> RedirectResponse:
        return RedirectResponse(_with_query("/", request) + "#layers", status_code=301)

    # anything else under /api/ is 404 (before the static mount, which would answer 405)
    def api_not_found() -> Any:
        raise HTTPException(404, "no such API route")
    for pattern in ("/api", "/api/{rest:path}"):
        app.add_api_route(pattern, api_not_found, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
                          include_in_schema=False, name=API_NOT_FOUND)

    web = Path(web_dir) if web_dir else WEB_DIR
    # only the files of web/: StaticFiles resolves and checks containment, never lists folders,
    # and does not follow symlinks out of it
    app.mount("/", StaticFiles(directory=web, html=True, check_dir=True), name="web")
    app.add_middleware(SecurityMiddleware, allowed_hosts=mon.allowed_hosts, token=token,
                       bind_host=bind_host, max_upload_bytes=mon.max_upload_bytes,
                       max_body_bytes=MAX_BODY_BYTES, upload_paths=UPLOAD_PATHS, routes=app.router.routes)
    # /openapi.json lists the middleware's answers (400/401/403/413/415/421) on every operation
    api_schema.install(app, token=bool(token), upload_paths=UPLOAD_PATHS,
                       max_upload_bytes=mon.max_upload_bytes, max_body_bytes=MAX_BODY_BYTES)
    return app


def _with_query(path: str, request: Request) -> str:
    q = request.url.query
    return f"{path}?{q}" if q else path
