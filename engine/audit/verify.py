"""``orthanc-ai audit verify``: is the local audit log's hash chain intact?"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import log_path
from .log import verify


def locate(args: argparse.Namespace) -> Path:
    """The log of ``serve --data DIR`` (DIR/orthanc-db/orthanc-ai/audit.log), of a
    node configured by ``--config FILE`` (its StorageDirectory, relative to the
    file's folder as Orthanc reads it), or the file given by ``--log``."""
    if args.log:
        return Path(args.log)
    if args.data:
        return log_path(Path(args.data).resolve() / "orthanc-db")
    from engine.config import load_orthanc_json

    config = Path(args.config)
    storage = Path(load_orthanc_json(config).get("StorageDirectory", "OrthancStorage"))
    if not storage.is_absolute():
        storage = config.resolve().parent / storage
    return log_path(storage)


def cmd_verify(args: argparse.Namespace) -> int:
    path = locate(args)
    if not path.exists():
        print(f"{path}: no audit log", file=sys.stderr)
        return 1
    verdict = verify(path)
    if verdict.ok:
        print(f"{path}: chain intact, {verdict.entries} entries")
        return 0
    print(f"{path}: chain broken at sequence number {verdict.first_bad}: {verdict.reason} "
          f"({verdict.entries} entries before it are intact)")
    return 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="the local audit trail")
    actions = audit.add_subparsers(dest="audit_command", required=True)
    check = actions.add_parser("verify", help="check the audit log's hash chain")
    where = check.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", help="the folder given to `serve --data`")
    where.add_argument("--config", help="the Orthanc configuration of the node")
    where.add_argument("--log", help="the audit log file itself")
