"""`jasper controller`: the REST control service (uvicorn) with an embedded SQLite database."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Any

from jasper_cli.options import PORT, Number, UsageError, input_file, output_file, positive

DEFAULT_DB = "jasper-controller.db"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "controller",
        help="run the controller (REST API for nodes, streams, MPs; tree planning)",
        description=(
            "Run the Jasper controller: market participants subscribe over REST, agents on "
            "relay and receiver hosts register, heartbeat and long-poll their plan. State is "
            "kept in SQLite (WAL). The admin token comes from JASPER_ADMIN_TOKEN (when unset, "
            "a random one is generated and printed once). Nodes enrol with one-time join "
            "tokens the admin issues (POST /v1/join-tokens, or --seed-join-tokens) and then "
            "use their own credentials; the legacy shared JASPER_NODE_TOKEN is off unless set."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=PORT, default=8080, help="listen port (default 8080)")
    p.add_argument(
        "--db",
        type=output_file.text(),
        default=os.environ.get("JASPER_DB_PATH", DEFAULT_DB),
        help=f"SQLite file (default $JASPER_DB_PATH or ./{DEFAULT_DB})",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=positive("s"),
        default=None,
        metavar="S",
        help="declare a node dead after S seconds without heartbeat (default 5)",
    )
    p.add_argument(
        "--seed-join-tokens",
        type=input_file.text(),
        metavar="FILE",
        help='JSON {"node name": "SHA-256 hex of its join token", ...}: join tokens made '
        "elsewhere (Terraform), stored before serving; seeding one again is harmless",
    )
    p.add_argument(
        "--join-token-ttl",
        type=Number(float, low=0, high=30 * 86400, low_open=True, unit="s"),
        default=86400.0,
        metavar="S",
        help="seeded join tokens expire S seconds after seeding (default 86400)",
    )
    p.add_argument(
        "--tls-cert",
        type=input_file.text(),
        metavar="FILE",
        help="serve HTTPS with this certificate chain (PEM); needs --tls-key. Without it the "
        "API is plain HTTP: keep it on loopback or a private network",
    )
    p.add_argument(
        "--tls-key", type=input_file.text(), metavar="FILE", help="private key of --tls-cert"
    )
    p.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        default="warning",
        help="uvicorn log level (warning)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from controller.app import create_app
    from controller.settings import Settings

    if (args.tls_cert is None) != (args.tls_key is None):
        print("jasper controller: error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if not os.environ.get("JASPER_ADMIN_TOKEN"):
        os.environ["JASPER_ADMIN_TOKEN"] = secrets.token_urlsafe(24)
        print(f"JASPER_ADMIN_TOKEN={os.environ['JASPER_ADMIN_TOKEN']}", file=sys.stderr)
    overrides: dict[str, Any] = {"db_path": args.db}
    if args.heartbeat_timeout is not None:
        overrides["heartbeat_timeout_s"] = args.heartbeat_timeout
    settings = Settings(**overrides)
    if settings.node_token is not None:
        print(
            "jasper controller: JASPER_NODE_TOKEN is set: any holder of that shared token may "
            "act as any node (legacy); enrol nodes with join tokens and unset it",
            file=sys.stderr,
        )
    if args.seed_join_tokens:
        try:
            seeds = read_seed_file(args.seed_join_tokens)
        except ValueError as exc:
            raise UsageError(f"--seed-join-tokens {args.seed_join_tokens}: {exc}") from None
        seed_join_tokens(settings.db_path, seeds, args.join_token_ttl)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
        # Long polls hold connections open; a node's poll must not stall a shutdown long.
        timeout_graceful_shutdown=2,
    )
    return 0


def read_seed_file(path: str) -> dict[str, str]:
    """{node name: SHA-256 hex} from a seed file; ValueError saying what is wrong."""
    import json
    import re

    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected an object {{node name: sha256 hex}}")
    for name, digest in doc.items():
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", name):
            raise ValueError(f"{path}: {name!r} is not a node name")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"{path}: the join token hash of {name!r} is not 64 hex digits")
    return dict(doc)


def seed_join_tokens(db_path: str, seeds: dict[str, str], ttl_s: float) -> int:
    """Store each node's join token hash (already stored ones are left as they are)."""
    from controller.credentials import seed_join_token
    from controller.store import Database

    database = Database(db_path)
    try:
        return sum(
            seed_join_token(database, token_hash=digest, nodes=(name,), ttl_s=ttl_s)
            for name, digest in seeds.items()
        )
    finally:
        database.close()
