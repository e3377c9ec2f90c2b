"""A node's controller credential: where it is kept, and the join token that enrols for it.

A node enrols once: it presents a one-time join token an admin issued for its name and gets
its own credential back, which it keeps in a 0600 file under its state folder, so a restart
re-uses it instead of needing a new join token (docs/security-nodes.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = "/var/lib/jasper"
JOIN_TOKEN_ENV = "JASPER_JOIN_TOKEN"
LEGACY_TOKEN_ENV = "JASPER_NODE_TOKEN"


class CredentialError(Exception):
    """The node has no way to authenticate (the operator's setup, not the controller)."""


@dataclass
class NodeCredentialSource:
    """What a node presents to the controller, and where it keeps what it was given."""

    credential_file: Path | None
    """Where the enrolled credential is kept (read at start, written after enrolment)."""
    credential: str | None = None
    """The credential in force (read from the file, or just enrolled)."""
    join_token: str | None = None
    """One-time join token, used when there is no credential or the controller refuses it."""

    def load(self) -> str | None:
        """The credential in the file, if there is one (else the one held); None: neither."""
        if self.credential_file is not None:
            self.credential = read_secret(self.credential_file) or self.credential
        return self.credential

    def save(self, credential: str) -> None:
        """Keep `credential` in the file (0600, written whole or not at all)."""
        self.credential = credential
        if self.credential_file is not None:
            save_credential(self.credential_file, credential)


def save_credential(path: Path, credential: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, credential.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def read_secret(path: Path) -> str | None:
    """The first line of a secret file; None when the file is missing or empty."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc.strerror}") from None
    return text or None


def add_credential_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("node credential (controller mode)")
    g.add_argument(
        "--credential-file",
        "--token-file",
        dest="credential_file",
        metavar="FILE",
        help="where this node's controller credential is kept: read at start, written (0600) "
        "after enrolling with a join token (default STATE_DIR/node-credential-NAME)",
    )
    g.add_argument(
        "--state-dir",
        metavar="DIR",
        default=os.environ.get("STATE_DIRECTORY") or DEFAULT_STATE_DIR,
        help="folder for the node's state (default $STATE_DIRECTORY or /var/lib/jasper)",
    )
    g.add_argument(
        "--ca-file",
        metavar="FILE",
        help="CA certificate(s) (PEM) to verify an https:// controller against (default: the "
        "system's CAs)",
    )
    join = g.add_mutually_exclusive_group()
    join.add_argument(
        "--join-token-file",
        metavar="FILE",
        help=f"one-time join token to enrol with (else ${JOIN_TOKEN_ENV})",
    )
    join.add_argument(
        "--join-token",
        metavar="TOKEN",
        help="one-time join token (visible in the process list: prefer --join-token-file)",
    )


def credential_source(args: argparse.Namespace, node_name: str) -> NodeCredentialSource:
    """The node's credential and join token from its arguments; CredentialError when it has
    neither (nothing the controller could accept)."""
    if getattr(args, "credential_file", None):
        path = Path(args.credential_file)
    else:
        state = getattr(args, "state_dir", None) or DEFAULT_STATE_DIR
        path = Path(state) / f"node-credential-{node_name}"
    join: str | None = getattr(args, "join_token", None)
    if getattr(args, "join_token_file", None):
        # A missing file is fine once the node holds a credential (a unit may keep passing
        # the file after first boot removed the spent token).
        join = read_secret(Path(args.join_token_file))
    join = join or os.environ.get(JOIN_TOKEN_ENV) or None
    credential = read_secret(path) or os.environ.get(LEGACY_TOKEN_ENV) or None
    if credential is None and join is None and getattr(args, "join_token_file", None):
        raise CredentialError(
            f"node {node_name} has no credential in {path} and its join token file "
            f"{args.join_token_file} is missing or empty"
        )
    if credential is None and join is None:
        raise CredentialError(
            f"node {node_name} has no credential in {path} and no join token: ask the admin "
            f"for one (POST /v1/join-tokens) and pass --join-token-file FILE or "
            f"${JOIN_TOKEN_ENV}"
        )
    return NodeCredentialSource(credential_file=path, credential=credential, join_token=join)
