"""`jasper controller`: the REST control service (uvicorn) with an embedded SQLite database."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Any

DEFAULT_DB = "jasper-controller.db"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "controller",
        help="run the controller (REST API for nodes, streams, MPs; tree planning)",
        description=(
            "Run the Jasper controller: market participants subscribe over REST, agents on "
            "relay and receiver hosts register, heartbeat and long-poll their plan. State is "
            "kept in SQLite (WAL). Tokens come from JASPER_ADMIN_TOKEN and JASPER_NODE_TOKEN; "
            "when unset, random ones are generated and printed once."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="listen port (default 8080)")
    p.add_argument(
        "--db",
        default=os.environ.get("JASPER_DB_PATH", DEFAULT_DB),
        help=f"SQLite file (default $JASPER_DB_PATH or ./{DEFAULT_DB})",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        metavar="S",
        help="declare a node dead after S seconds without heartbeat (default 5)",
    )
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from controller.app import create_app
    from controller.settings import Settings

    generated = []
    for var in ("JASPER_ADMIN_TOKEN", "JASPER_NODE_TOKEN"):
        if not os.environ.get(var):
            os.environ[var] = secrets.token_urlsafe(24)
            generated.append(var)
    for var in generated:
        print(f"{var}={os.environ[var]}", file=sys.stderr)
    overrides: dict[str, Any] = {"db_path": args.db}
    if args.heartbeat_timeout is not None:
        overrides["heartbeat_timeout_s"] = args.heartbeat_timeout
    settings = Settings(**overrides)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # Long polls hold connections open; a node's poll must not stall a shutdown long.
        timeout_graceful_shutdown=2,
    )
    return 0
