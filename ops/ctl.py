"""trainer-ctl: steer the daemon and its queue, from the shell or over ssh.

Training commands go to the running daemon as control requests. Queue changes go through the
daemon when it runs; when it does not, trainer-ctl takes the daemon lock and applies them
itself, so there is never more than one writer of the queue.

Exit codes: 0 ok, 1 refused/failed, 2 bad usage or input, 3 daemon not running,
4 daemon did not answer in time.

This module is the parser and the entry point; the commands are in ``ops/ctl_daemon.py``
(status, training, check, monitor, logs), ``ops/ctl_queue.py``, ``ops/ctl_config.py`` (config,
presets) and ``ops/ctl_model.py`` (bases, adapters, demo data); their text in ``ops/describe.py``.
"""
from __future__ import annotations

import argparse
import os
import sys

from core.config import LOCKED_KEYS
from core.diskfull import describe as describe_disk, is_disk_full
from core.paths import Layout
from core.states import JobState, Priority
from ops.ctl_common import EXIT_FAIL, EXIT_OK, err
from ops.ctl_config import cmd_config_show, cmd_config_unlock, cmd_preset
from ops.ctl_daemon import cmd_check, cmd_logs, cmd_monitor, cmd_status, cmd_training
from ops.ctl_model import cmd_consolidate, cmd_eval, cmd_generate, cmd_init_base, cmd_lineage, cmd_snapshot
from ops.promote import cmd_promote, cmd_rollback
from ops.ctl_queue import (cmd_queue_add, cmd_queue_list, cmd_queue_prioritize, cmd_queue_remove, cmd_queue_retry,
                           cmd_queue_show)

def _add_daemon_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("status", help="what runs, step, loss, queue counts (exit 3 if the daemon is down)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    for name, text in (("pause", "pause at the next step boundary"), ("resume", "resume training"),
                       ("skip", "end the current job into queue/failed/ (reason: skipped)"),
                       ("stop", "stop the daemon gracefully; the current job resumes at next start")):
        sub.add_parser(name, help=text).set_defaults(func=cmd_training)


def _add_queue_commands(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("queue", help="add, list, remove, retry, prioritize datasets")
    qs = q.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    a = qs.add_parser("add", help="copy FILE into the queue")
    a.add_argument("file")
    a.add_argument("--priority", choices=[x.value for x in Priority], default="normal")
    a.add_argument("--force", action="store_true", help="train even if the same content was trained")
    a.set_defaults(func=cmd_queue_add)
    ls = qs.add_parser("list", help="every job with its state")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--state", choices=[x.value for x in JobState])
    ls.set_defaults(func=cmd_queue_list)
    sh = qs.add_parser("show", help="one job: its fields, its data report, its intake validation")
    sh.add_argument("name", help="queue name (or job id)")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_queue_show)
    r = qs.add_parser("remove", help="take a pending job out of the queue (kept in failed/)")
    r.add_argument("name")
    r.set_defaults(func=cmd_queue_remove)
    t = qs.add_parser("retry", help="move a failed job back to pending")
    t.add_argument("name")
    t.add_argument("--force", action="store_true", help="retry even if the content was already trained")
    t.set_defaults(func=cmd_queue_retry)
    pr = qs.add_parser("prioritize", help="set a pending job's priority")
    pr.add_argument("name")
    pr.add_argument("level", choices=[x.value for x in Priority])
    pr.set_defaults(func=cmd_queue_prioritize)


def _add_config_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("config", help="show config, unlock a locked key")
    cs = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    u = cs.add_parser("unlock", help="accept config.json's value for a locked key")
    u.add_argument("key", choices=LOCKED_KEYS)
    u.set_defaults(func=cmd_config_unlock)
    cs.add_parser("show", help="validated config and recorded locked values").set_defaults(func=cmd_config_show)


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    ib = sub.add_parser("init-base", help="build the embedded tiny base model")
    ib.add_argument("--tiny", action="store_true", required=True)
    ib.add_argument("--name")
    ib.add_argument("--seed", type=int, default=0)
    ib.add_argument("--set-default", action="store_true", help="make it config.json's base_model")
    ib.set_defaults(func=cmd_init_base)
    g = sub.add_parser("generate", help="write built-in demo data (chat JSONL)")
    g.add_argument("--count", type=int, default=200)
    g.add_argument("--out", help="folder (default: inbox/)")
    g.add_argument("--seed", type=int)
    g.set_defaults(func=cmd_generate)
    sn = sub.add_parser("snapshot", help="copy the live adapter to snapshots/ with a description")
    sn.add_argument("--description", required=True)
    sn.set_defaults(func=cmd_snapshot)
    cn = sub.add_parser("consolidate", help="merge the live adapter into a new base (it becomes base_model)")
    cn.add_argument("--description", required=True)
    cn.add_argument("--pause", action="store_true",
                    help="stop a running job at the next step first (it restarts on the new base)")
    cn.set_defaults(func=cmd_consolidate)
    li = sub.add_parser("lineage", help="the chain of bases and adapters, with datasets")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_lineage)
    for name, text in (("promote", "make a snapshot (a candidate the promotion gate held back) current_model/"),
                       ("rollback", "make an earlier snapshot current_model/ again")):
        pm = sub.add_parser(name, help=text + " (the daemon must be stopped; the old one is kept as a snapshot)")
        pm.add_argument("snapshot", help="a folder name in snapshots/ (trainer-ctl lineage lists moves)")
        pm.set_defaults(func=cmd_promote if name == "promote" else cmd_rollback)
    ev = sub.add_parser("eval", help="the forgetting matrix: each dataset's retention loss after every job")
    ev.add_argument("--json", action="store_true", help="the matrix as JSON (as status/eval.json)")
    ev.set_defaults(func=cmd_eval)


def _add_tool_commands(sub: argparse._SubParsersAction) -> None:
    ps = sub.add_parser("preset", help="list presets, or switch to one (only while no job is mid-way)")
    ps.add_argument("name", nargs="?", help="preset name, or 'none'")
    ps.set_defaults(func=cmd_preset)
    mo = sub.add_parser("monitor", help="serve the dashboard and API (default http://127.0.0.1:8080/; "
                                        "bin/monitor.sh --background to detach)")
    mo.add_argument("--host")
    mo.add_argument("--port", type=int)
    mo.set_defaults(func=cmd_monitor)
    ck = sub.add_parser("check", help="health: config, locked keys, base, queue, disk, checkpoints, GPU")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(func=cmd_check)
    lg = sub.add_parser("logs", help="tail the daemon and training logs")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=40)
    lg.set_defaults(func=cmd_logs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer-ctl", description="control the continuous fine-tuning daemon")
    p.add_argument("--home", help="base dir (default: $TRAINER_HOME or the repo root)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_daemon_commands, _add_queue_commands, _add_config_commands, _add_model_commands,
                _add_tool_commands):     # in the order `trainer-ctl --help` lists them
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout.from_env(args.home)
    try:
        return args.func(layout, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:          # `trainer-ctl queue list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:         # a full disk is one clear line, never a traceback
        if not is_disk_full(exc):
            raise
        err(f"{describe_disk(layout.home)}: {getattr(exc, 'strerror', None) or exc}; nothing was changed")
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
