"""``python -m client``: classify files, folders and globs with a running service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import httpx
from tqdm import tqdm

from .api import DEFAULT_URL, Client, ServiceUnavailableError
from .files import expand
from .output import WRITERS

# Past the service's batches (32 images) and what a worker holds at once (MAX_CONNECTIONS), more in flight only
# queues: a client's own CPU went into the waiting (300 in flight: 31 s of 32 on 3,000 small PNGs)
MAX_CONCURRENCY = 256

EPILOG = """\
examples:
  python -m client cat.jpg                               # the service's default model
  python -m client photos/ --model resnet50 --concurrency 8
  python -m client 'scans/**/*.png' --format csv --output labels.csv
  API_TOKEN=... python -m client photos/ --url http://gpu-box:3000
  python -m client photos/ --explain heatmaps/           # and where the network looked, one PNG per image

exit status: 0 when every file was classified (and, with --explain, every heat map written),
1 when any failed, 2 when the service or the output could not be used at all; as a shell's,
141 when the reader of its output went away (| head) and 130 on Ctrl-C.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Classify images with a running CNN serving service (POST /classify).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    parser.add_argument("--model", help="model name (see GET /models); default: the service's default")
    parser.add_argument("--url", default=os.environ.get("CNN_SERVING_URL", DEFAULT_URL), help="default: %(default)s")
    parser.add_argument("--top-k", type=int, default=5, help="predictions per image (default: %(default)s)")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight, 1 to 256 (default: %(default)s)"
    )
    parser.add_argument("--format", choices=sorted(WRITERS), default="table", help="default: %(default)s")
    parser.add_argument("--output", help="write results to this file instead of standard output")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    explain = "also write each image's heat map for its top-1 class here (POST /explain), as PNG"
    parser.add_argument("--explain", metavar="OUT_DIR", type=Path, help=explain)
    args = parser.parse_args(argv)
    if args.top_k < 1 or not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--top-k must be at least 1, and --concurrency from 1 to {MAX_CONCURRENCY}")
    if "" in args.paths:  # as "." it would search the current folder: an unset shell variable, most likely
        parser.error("a PATH is empty: name files, folders or globs")
    if not args.timeout > 0:
        parser.error("--timeout must be a number of seconds above 0")
    if problem := _url_problem(args.url):
        parser.error(f"--url {_shown(args.url)} (or CNN_SERVING_URL) {problem}")
    return args


def _url_problem(url: str) -> str | None:
    """What keeps ``url`` from being the service's base URL, or None."""
    try:
        parsed = httpx.URL(url)
        port = parsed.port  # a port that is not a number raises here
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        return f"is not a URL ({exc}): write it as http://HOST:PORT"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        rest = url if "://" not in url else ""  # localhost:3000: the scheme left out
        return f"is not an http:// or https:// URL: write it as http://{_shown(rest) or 'HOST:PORT'}"
    if port is not None and not 1 <= port <= 65535:
        return f"has port {port}: a port is from 1 to 65535"
    return None


def _shown(url: str) -> str:
    """``url`` as an error may show it: a password in it replaced by ``***``."""
    return re.sub(r"(^|//)([^/@:]*:)[^/@]*@", r"\1\2***@", url) if "@" in url else url


@contextlib.contextmanager
def _destination(path: str | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        return
    # surrogateescape: a file name that is no UTF-8 (bytes as the disk has them) is written as those bytes
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as stream:
        yield stream


async def run(args: argparse.Namespace, paths: list[str], stream: TextIO, client: Client) -> int:
    write = WRITERS[args.format](stream, args.top_k, paths, explain=args.explain is not None)
    failed = unexplained = 0
    show = not args.no_progress and sys.stderr.isatty()
    # Rows to the bar's terminal: the bar is cleared for each, then drawn again below it (a row landed after its text)
    shares_terminal = show and stream.isatty()
    with tqdm(total=len(paths), unit="image", disable=not show, file=sys.stderr) as progress:
        results = client.stream(
            paths, model=args.model, top_k=args.top_k, concurrency=args.concurrency,
            on_done=lambda _: progress.update(), explain_dir=args.explain,
        )  # fmt: skip
        async for result in results:
            if shares_terminal:
                with tqdm.external_write_mode(file=stream):
                    write(result)
                    stream.flush()  # before the bar is drawn again
            else:
                write(result)
            failed += not result.ok
            unexplained += result.explanation_failed
    if failed:
        sys.stderr.write(f"{failed} of {len(paths)} files failed\n")
    if unexplained:
        asked = len(paths) - failed  # a file that failed was not explained
        sys.stderr.write(f"{unexplained} of {asked} heat maps were not written (see each one's explanation)\n")
    return 1 if failed or unexplained else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths = expand(args.paths)
    except KeyboardInterrupt:  # a large tree being searched
        sys.stderr.write("interrupted while searching the paths: nothing was sent\n")
        return 130
    if not paths:
        sys.stderr.write("No image found in the given paths\n")
        return 1
    if args.explain is not None and args.explain.resolve() in _folders_of(paths):
        sys.stderr.write(f"error: --explain {args.explain} holds images being classified, and a heat map "
                         "(<file stem>.png) could replace one: choose another folder\n")  # fmt: skip
        return 2
    try:
        client = Client(args.url, timeout=args.timeout)
        client.check(args.top_k)  # before --output is opened: a service down or a wrong token leaves the old results
        if args.explain is not None:
            args.explain.mkdir(parents=True, exist_ok=True)
        with _destination(args.output) as stream:
            return asyncio.run(run(args, paths, stream, client))
    except ServiceUnavailableError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except BrokenPipeError:  # the reader went away (| head): not an error of the run
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second failure flushing at exit
        return 141
    except OSError as exc:  # --output or --explain cannot be written
        sys.stderr.write(f"error: {_unwritable(args, exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the output holds the files answered before it, in input order\n")
        return 130


def _unwritable(args: argparse.Namespace, exc: OSError) -> str:
    """An output that cannot be written, by the option that named it: ``--explain out: File exists (a folder is
    wanted)``."""
    if exc.filename is None:
        return str(exc)
    written = Path(exc.filename)
    if args.output is not None and written == Path(args.output):
        wanted = "a file is wanted" if written.is_dir() else "give a file that can be written"
        return f"--output {args.output}: {exc.strerror} ({wanted})"
    if args.explain is not None and args.explain in (written, *written.parents):
        wanted = "a folder is wanted" if args.explain.is_file() else "give a folder that can be written"
        return f"--explain {args.explain}: {exc.strerror} ({wanted})"
    return f"{exc.filename}: {exc.strerror}"


def _folders_of(paths: list[str]) -> set[Path]:
    return {Path(path).resolve().parent for path in paths}
