"""The operator's command line on the shim's store: list uploads, re-queue a failed delivery,
purge one.

    python -m shim uploads [--json] [--config FILE]
    python -m shim retry ID [--config FILE]
    python -m shim purge ID [--config FILE]

It opens the same store the shim uses (`storage` of the config: the local folder, or Redis
and the shared folder that several instances use) and is safe to run while the shim serves:
the local records (diskcache) and indexes (SQLite, WAL) are multi-process safe, Redis is
shared by design, and every change is compare-and-set through `shim.store.transition` /
`Store.remove`, so a change a shim makes meanwhile is never overwritten. The command line
never drops the shim's leases (`LocalStore.drop_leases` belongs to the one process that owns
the folder); a
purge takes an upload's own leases for the moment it removes it, so that no request starts
writing to, and no worker starts delivering, an upload that is going away.

Exit codes: 0 done, 1 refused (one line on stderr says why), 2 bad usage or a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.filesize import decimal
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from shim import config as shim_config
from shim.backends import open_store
from shim.lifecycle import Event, IllegalTransition, State
from shim.model import Upload
from shim.redis_store import safe_url
from shim.store import Conflict, Store, StoreError, pieces, transition

OWNER_CHARS = 12
"""How much of an owner's hash is shown: enough to tell owners apart, not a credential."""
NEEDS_PARTS = frozenset({State.RECEIVING, State.COMPLETE, State.DELIVERING, State.FAILED})
"""States of a final (concatenated) upload that still reads its parts' bytes (as the
engine's `_NEEDS_PARTS`): a part it needs is not purged before it."""
PURGE_LEASE_TTL = 30.0
"""A purge holds the upload's leases this long at most: a crashed command line's leases
lapse on their own, as a crashed shim's do."""
BAR_WIDTH = 20


class Refused(Exception):
    """What the operator asked cannot be done now; the message is the one line shown."""


# --- listing ------------------------------------------------------------------------------


def describe(upload: Upload, now: float) -> dict[str, Any]:
    """One upload as `uploads --json` prints it: the same keys, in the same order, always."""
    answer = upload.answer
    target = upload.target
    return {
        "id": upload.id,
        "protocol": upload.protocol,
        "owner": upload.owner[:OWNER_CHARS],
        "state": str(upload.state),
        "bytes": upload.offset,
        "total": upload.length,
        "created": upload.created,
        "updated": upload.updated,
        "age": round(max(0.0, now - upload.created), 3),
        "attempts": upload.attempts,
        "next_attempt": upload.next_attempt if upload.state is State.COMPLETE else None,
        "status": answer.status if answer is not None else None,
        "reason": answer.reason if answer is not None else None,
        "problem": upload.problem,
        "destination": f"{target.method} {target.path}" if target is not None else None,
    }


async def all_uploads(store: Store) -> list[Upload]:
    """Every stored upload, oldest first. A scan of every record: fine for a command run by
    hand, off the shim's event loop. An upload removed during the scan is left out."""
    found = [upload for upload_id in await store.ids()
             if (upload := await store.load(upload_id)) is not None]
    return sorted(found, key=lambda upload: (upload.created, upload.id))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _last_delivery(upload: Upload) -> str:
    """The legacy server's recorded answer, else why the last attempt got none."""
    if upload.answer is not None:
        return f"{upload.answer.status} {upload.answer.reason}".rstrip()
    return upload.problem or "-"


def table(uploads: list[Upload], now: float) -> Table:
    """Every column but the last is never cut (the id is what `retry` and `purge` take, and a
    state or size cut short misleads); the last delivery result, which can be a long
    problem, wraps instead."""
    bars: list[ProgressBar | Text] = []
    cells: list[tuple[str, ...]] = []
    for upload in uploads:
        share = ""
        if upload.length:
            bars.append(ProgressBar(total=upload.length, completed=upload.offset, width=BAR_WIDTH))
            share = f" {min(100, upload.offset * 100 // upload.length)}%"
        elif upload.length == 0:
            bars.append(ProgressBar(total=1, completed=1, width=BAR_WIDTH))
            share = " 100%"
        else:
            bars.append(Text("length unknown"))
        total = decimal(upload.length) if upload.length is not None else "?"
        cells.append((upload.id, upload.protocol, upload.owner[:OWNER_CHARS] or "-",
                      f"{decimal(upload.offset)} / {total}{share}", _age(now - upload.created),
                      str(upload.state)))
    view = Table()
    columns = (("ID", "left"), ("Protocol", "left"), ("Owner", "left"), ("Bytes", "right"),
               ("Age", "right"), ("State", "left"))
    for index, (name, justify) in enumerate(columns):
        widest = max([len(name), *(len(row[index]) for row in cells)])
        view.add_column(name, justify=justify, no_wrap=True, min_width=widest)  # type: ignore[arg-type]
        if name == "Owner":
            view.add_column("Progress", no_wrap=True, min_width=BAR_WIDTH)
    view.add_column("Last delivery", overflow="fold", min_width=16)
    for upload, bar, row in zip(uploads, bars, cells, strict=True):
        view.add_row(*row[:3], bar, *row[3:], _last_delivery(upload))
    return view


async def list_uploads(store: Store, as_json: bool) -> None:
    now = time.time()
    uploads = await all_uploads(store)
    if as_json:
        print(json.dumps([describe(upload, now) for upload in uploads], indent=2))
        return
    console = Console()
    if not console.is_terminal:
        console.width = 1000  # piped: one line per upload, nothing cut or folded
    if not uploads:
        console.print("no uploads", highlight=False)
        return
    view = table(uploads, now)
    # Narrower than the columns that are never cut: print long lines (the terminal wraps
    # them) rather than crop them.
    needed = console.measure(view, options=console.options.update_width(10_000)).minimum
    console.width = max(console.width, needed)
    console.print(view)


# --- changing one upload ------------------------------------------------------------------


async def _existing(store: Store, upload_id: str) -> Upload:
    upload = await store.load(upload_id) if _plausible_id(upload_id) else None
    if upload is None:
        raise Refused(f"no upload {upload_id!r} in this store")
    return upload


def _plausible_id(upload_id: str) -> bool:
    """What the store could name a data file by (anything else is certainly unknown)."""
    return bool(upload_id) and "/" not in upload_id and not upload_id.startswith(".")


async def _missing_bytes(store: Store, upload: Upload) -> str:
    """Why the shim's copy of the file is not whole ("" when it is): a retry of such an
    upload would only fail again (the outbox checks the same before sending)."""
    ids, sizes = await pieces(store, upload)
    if sum(sizes) != upload.length:
        return "a part of this upload is gone"
    for upload_id, size in zip(ids, sizes, strict=True):
        if size and await store.size(upload_id) < size:
            return f"the shim's copy of {upload_id} is shorter than recorded"
    return ""


async def retry(store: Store, upload_id: str) -> tuple[Upload, bool]:
    """Re-queue a FAILED delivery: COMPLETE again, due now, with a fresh give-up clock. The
    running shim's delivery worker finds it in the outbox within its tick (5 s). Returns the
    saved record, and whether the failed attempt had sent the whole file without an answer
    (`delivery.on_unknown: hold`): the legacy server may have it already."""
    upload = await _existing(store, upload_id)
    if upload.state is not State.FAILED:
        raise Refused(f"upload {upload_id} is {upload.state}, not failed: only a failed "
                      "delivery can be retried")
    missing = await _missing_bytes(store, upload)
    if missing:
        raise Refused(f"upload {upload_id} cannot be delivered: {missing}; purge it instead")
    now = time.time()
    try:
        saved = await transition(store, upload, Event.RETRY, next_attempt=now, updated=now,
                                 problem="", attempts=0, first_attempt=None,
                                 last_bytes_sent=False, answer=None)
    except IllegalTransition as exc:
        raise Refused(f"upload {upload_id} changed meanwhile and is now {exc.state}, not "
                      "failed") from None
    except Conflict:
        raise Refused(f"upload {upload_id} was removed meanwhile") from None
    return saved, upload.last_bytes_sent


async def purge(store: Store, upload_id: str) -> Upload:
    """Remove one upload, its record and its bytes, unless a delivery of it is under way (its
    outcome is not known yet), a request is writing to it right now, or it is a part a
    final upload still needs.

    While it goes, the purge holds the upload's write lease (no request starts writing to
    it, or re-creates its data file after the removal) and, while it is COMPLETE, its
    delivery lease (no worker starts delivering it). The delivery lease is not wanted in
    any other state: the worker does nothing with those, though it may still hold the lease
    for a moment after recording an outcome."""
    upload = await _existing(store, upload_id)
    if upload.state is State.DELIVERING:
        raise Refused(f"upload {upload_id} is being delivered now; purge it once the delivery "
                      "has ended")
    for _, whole_id in await store.links(f"part-of:{upload_id}:"):
        whole = await store.load(whole_id)
        if whole is not None and whole.state in NEEDS_PARTS:
            raise Refused(f"upload {upload_id} is a part of upload {whole_id}, which is "
                          f"{whole.state} and still needs its bytes; purge {whole_id} first")
    holder = f"operator:{secrets.token_hex(4)}"
    taken: list[str] = []

    async def take(lease: str, doing: str) -> None:
        if lease in taken:
            return
        if not await store.acquire(lease, holder, PURGE_LEASE_TTL):
            raise Refused(f"upload {upload_id} is busy ({doing}); try again in a moment")
        taken.append(lease)

    try:
        # The lease names the shim's engine and outbox use (shim/engine.py, shim/outbox.py).
        await take(f"write:{upload_id}", "a request is writing to it")
        for _ in range(64):
            current = await store.load(upload_id)
            if current is None:
                raise Refused(f"no upload {upload_id!r} in this store")
            if current.state is State.DELIVERING:
                raise Refused(f"upload {upload_id} is being delivered now; purge it once the "
                              "delivery has ended")
            if current.state is State.COMPLETE:
                await take(f"deliver:{upload_id}", "a delivery attempt is starting")
            try:
                await store.remove(current)
                return current
            except Conflict:
                continue  # changed between load and remove (say, queued): look again
        raise Refused(f"upload {upload_id} kept changing; try again")
    finally:
        for lease in taken:
            await store.release(lease, holder)


# --- the command line ---------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m shim", description="Operate on the uploads in the shim's store "
        "(safe while the shim runs).")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "the shim's YAML config file, for storage.dir (default: embedded defaults)"
    listing = commands.add_parser("uploads", help="list the uploads in the store, oldest first")
    listing.add_argument("--json", action="store_true", help="one JSON list, for scripts")
    listing.add_argument("--config", default="", help=config_help)
    again = commands.add_parser("retry", help="re-queue the failed delivery of an upload")
    again.add_argument("id", help="the upload id (from `uploads`)")
    again.add_argument("--config", default="", help=config_help)
    gone = commands.add_parser("purge", help="remove an upload, its record and its bytes")
    gone.add_argument("id", help="the upload id (from `uploads`)")
    gone.add_argument("--config", default="", help=config_help)
    return top


async def _with_store(storage: shim_config.StorageConfig,
                      work: Callable[[Store], Awaitable[None]]) -> None:
    store = open_store(storage, serving=False)
    try:
        await work(store)
    finally:
        await store.close()


async def _run(args: argparse.Namespace, storage: shim_config.StorageConfig) -> None:
    async def work(store: Store) -> None:
        if args.command == "uploads":
            await list_uploads(store, args.json)
        elif args.command == "retry":
            upload, unknown = await retry(store, args.id)
            print(f"upload {upload.id} is queued for delivery again")
            if unknown:
                print("note: its last attempt sent the whole file and got no answer; the "
                      "legacy server may have it already")
        else:
            upload = await purge(store, args.id)
            print(f"upload {upload.id} ({upload.state}, {upload.offset} bytes) is purged")

    await _with_store(storage, work)


def main(argv: list[str]) -> int:
    """`python -m shim uploads|retry|purge ...`; the exit code (see the module docstring)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or bad usage (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = shim_config.load(args.config or None)
    except shim_config.ConfigError as exc:
        print(f"shim: {exc}", file=sys.stderr)
        return 2
    directory = Path(config.storage.dir).resolve()
    # Opening a store creates its folders: a wrong --config must not leave an empty one.
    expected = directory / ("data" if config.storage.backend == "redis" else "meta")
    if not expected.is_dir():
        print(f"shim: no upload store in {directory} (storage.dir of "
              f"{args.config or 'the embedded config'})", file=sys.stderr)
        return 1
    where = safe_url(config.storage.redis_url) if config.storage.backend == "redis" \
        else str(directory)
    try:
        asyncio.run(_run(args, config.storage))
    except Refused as exc:
        print(f"shim: {exc}", file=sys.stderr)
        return 1
    except (StoreError, OSError) as exc:
        print(f"shim: the store in {where} cannot be used: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
