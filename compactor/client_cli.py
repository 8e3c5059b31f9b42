"""The client half of the ``compactor`` command: talk to a running server over HTTP.

    compactor submit MODEL [--dataset F] [--spec FILE|JSON] [--wait] [--out DIR] [--idempotency-key K] [--json]
    compactor status JOB_ID [--json]
    compactor list [--status S] [--limit N] [--json]
    compactor cancel JOB_ID [--json]
    compactor download JOB_ID [NAME ...] [--out DIR]

Every command takes ``--url`` (default ``$COMPACTOR_URL`` or http://127.0.0.1:8000)
and ``--api-key`` (default ``$COMPACTOR_API_KEY``). Results go to stdout, progress
and errors to stderr, so ``JOB=$(compactor submit model.ts)`` works.

Exit codes: 0 success; 1 the job failed or was cancelled (``submit --wait``,
``status``); 2 usage or API error (the problem's title, detail and field errors
are printed, never a traceback), and a download whose checksum does not match;
3 the server could not be reached.

``launcher.cli`` registers these commands with ``add_client_commands``; ``main``
runs them alone (tests, or a client-only install). Only httpx is imported: never torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from compactor.client import (
    ApiError,
    ChecksumMismatch,
    Client,
    CompactorClientError,
    TransportError,
)

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_ERROR = 2
EXIT_CONNECTION = 3

Command = Callable[[argparse.Namespace, Client], int]


# -- progress on stderr


class ProgressLine:
    """One status line on stderr.

    On a terminal it rewrites itself in place (throttled, so a fast upload does not
    flood the terminal); elsewhere (logs, CI) it prints a plain line only when the
    text changes, and callers pass coarse text there so a 2 GiB upload is ~10 lines.
    """

    def __init__(self, stream: TextIO | None = None, *, min_interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval
        self._last_text = ""
        self._last_time = 0.0
        self._width = 0

    def show(self, text: str, *, force: bool = False) -> None:
        if text == self._last_text:
            return
        now = time.monotonic()
        if self.tty:
            if not force and now - self._last_time < self.min_interval:
                return
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_text = text
        self._last_time = now

    def done(self) -> None:
        """End the in-place line so later output starts on a fresh one."""
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
        self._width = 0
        self._last_text = ""


def _bar(fraction: float, width: int = 24) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _size(n: float) -> str:
    """Decimal units, as download tools print them: 950 B, 12.3 kB, 4.5 MB, 1.2 GB."""
    if n < 1e3:
        return f"{n:.0f} B"
    for unit, scale in (("kB", 1e3), ("MB", 1e6)):
        if n < scale * 1e3:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e9:.2f} GB"


class TransferProgress:
    """``(sent, total)`` callback that draws ``label [####....] 12.3 MB/45.6 MB 7.8 MB/s``."""

    def __init__(self, line: ProgressLine, label: str) -> None:
        self.line = line
        self.label = label
        self.start = time.monotonic()

    def __call__(self, sent: int, total: int) -> None:
        fraction = sent / total if total else 1.0
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = sent / elapsed
        finished = total and sent >= total
        if self.line.tty:
            text = f"{self.label} {_bar(fraction)} {_size(sent)}/{_size(total)} {_size(rate)}/s"
        else:
            # Plain output: one line per 10 % step keeps logs short.
            step = int(fraction * 10) * 10
            text = f"{self.label}: {step}% of {_size(total)}" + (f" ({_size(rate)}/s)" if finished else "")
        self.line.show(text, force=bool(finished) or sent == 0)


class JobProgress:
    """``wait`` callback: ``job_abc running  prune  [######....]  42%``."""

    def __init__(self, line: ProgressLine) -> None:
        self.line = line

    def __call__(self, job: dict[str, Any]) -> None:
        status = str(job.get("status"))
        stage = job.get("stage") or "-"
        percent = int(float(job.get("progress") or 0.0) * 100)
        text = f"{job.get('id')} {status:<9} {stage:<9} {_bar(percent / 100)} {percent:3d}%"
        self.line.show(text, force=True)


# -- human output


def _fmt_ratio(value: Any, suffix: str = "×") -> str:
    return f"{value:.3g}{suffix}" if isinstance(value, int | float) else "n/a"


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def metrics_summary(metrics: dict[str, Any] | None) -> list[str]:
    """A short before → after summary: accuracy, size, MACs, speedup at batch 1 and 32."""
    if not metrics:
        return ["metrics:    none"]
    lines = []
    before, after = _get(metrics, "original", "accuracy", "top1"), _get(metrics, "compressed", "accuracy", "top1")
    if isinstance(before, int | float) and isinstance(after, int | float):
        lines.append(f"accuracy:   top-1 {before:.2%} → {after:.2%} ({(after - before) * 100:+.2f} pt)")
    else:
        lines.append("accuracy:   not measured (no dataset with targets)")
    size_before, size_after = _get(metrics, "original", "size_bytes"), _get(metrics, "compressed", "size_bytes")
    ratios = metrics.get("ratios") or {}
    if isinstance(size_before, int) and isinstance(size_after, int):
        lines.append(f"size:       {_size(size_before)} → {_size(size_after)} (ratio {_fmt_ratio(ratios.get('size'), '')})")
    else:
        lines.append(f"size:       ratio {_fmt_ratio(ratios.get('size'), '')}")
    lines.append(f"MACs:       ratio {_fmt_ratio(ratios.get('macs'), '')}")
    lines.append(f"speedup:    batch 1 {_fmt_ratio(ratios.get('speedup_batch_1'))}, batch 32 {_fmt_ratio(ratios.get('speedup_batch_32'))}")
    return lines


def _print_job(job: dict[str, Any], out: TextIO) -> None:
    progress = float(job.get("progress") or 0.0)
    print(f"id:         {job.get('id')}", file=out)
    print(
        f"status:     {job.get('status')}" + (" (cancel requested)" if job.get("cancel_requested") and job.get("status") == "running" else ""),
        file=out,
    )
    print(f"stage:      {job.get('stage') or '-'}", file=out)
    print(f"progress:   {progress:.0%}", file=out)
    for key in ("created_at", "started_at", "finished_at"):
        if job.get(key):
            print(f"{key + ':':<11} {job[key]}", file=out)
    print(f"attempts:   {job.get('attempts', 0)}", file=out)
    error = job.get("error")
    if error:
        print(f"error:      {error.get('code')}: {error.get('message')}", file=out)
    if job.get("status") == "succeeded":
        for line in metrics_summary(job.get("metrics")):
            print(line, file=out)
    for artifact in job.get("artifacts") or []:
        print(f"artifact:   {artifact.get('name')} ({artifact.get('size_bytes')} bytes, sha256 {artifact.get('sha256')})", file=out)


def _print_json(document: Any, out: TextIO) -> None:
    json.dump(document, out, indent=2, sort_keys=True)
    out.write("\n")


def _print_problem(error: ApiError, err: TextIO) -> None:
    print(f"error: {error.status} {error.title}: {error.detail}" + (f" [{error.code}]" if error.code else ""), file=err)
    for item in error.errors:
        loc = ".".join(str(part) for part in item.get("loc", []))
        print(f"  {loc or '(request)'}: {item.get('msg')}", file=err)


def _job_exit(job: dict[str, Any]) -> int:
    return EXIT_JOB_FAILED if job.get("status") in ("failed", "cancelled") else EXIT_OK


# -- commands


def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    if args.out and not args.wait:
        print("compactor submit: --out needs --wait (artifacts exist once the job has succeeded)", file=sys.stderr)
        return EXIT_ERROR
    line = ProgressLine()
    show_progress = not args.quiet
    job = client.submit(
        args.model,
        dataset=args.dataset,
        spec=args.spec,
        idempotency_key=args.idempotency_key,
        on_upload_progress=TransferProgress(line, "upload") if show_progress else None,
    )
    line.done()
    if not args.wait:
        if args.json:
            _print_json(job, sys.stdout)
        else:
            print(job["id"])
        return EXIT_OK
    if not args.json:
        # The id first, so a user who interrupts the wait can still find the job.
        print(job["id"], flush=True)
    job = client.wait(job["id"], poll_interval=args.poll_interval, on_progress=JobProgress(line) if show_progress else None)
    line.done()
    if args.json:
        _print_json(job, sys.stdout)
    else:
        print(f"status:     {job['status']}")
        error = job.get("error")
        if error:
            print(f"error:      {error.get('code')}: {error.get('message')}")
        if job["status"] == "succeeded":
            for text in metrics_summary(job.get("metrics")):
                print(text)
    if job["status"] == "succeeded" and args.out:
        paths = client.download_all(job["id"], args.out, on_progress=None if not show_progress else _named_progress(line))
        line.done()
        for path in paths:
            print(f"saved:      {path}", file=sys.stderr if args.json else sys.stdout)
    return _job_exit(job)


def _named_progress(line: ProgressLine) -> Callable[[str, int, int], None]:
    bars: dict[str, TransferProgress] = {}

    def callback(name: str, sent: int, total: int) -> None:
        bars.setdefault(name, TransferProgress(line, name))(sent, total)

    return callback


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    job = client.get(args.job_id)
    if args.json:
        _print_json(job, sys.stdout)
    else:
        _print_job(job, sys.stdout)
    return _job_exit(job)


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    if args.limit is not None and args.limit < 1:
        print("compactor list: --limit must be at least 1", file=sys.stderr)
        return EXIT_ERROR
    jobs = list(client.list(status=args.status, limit=args.limit))
    if args.json:
        _print_json(jobs, sys.stdout)
        return EXIT_OK
    if not jobs:
        print("no jobs", file=sys.stderr)
        return EXIT_OK
    width = max(len("ID"), *(len(str(job.get("id"))) for job in jobs))
    print(f"{'ID':<{width}}  {'STATUS':<9}  {'STAGE':<9}  {'PROGRESS':>8}  CREATED")
    for job in jobs:
        progress = f"{float(job.get('progress') or 0.0):.0%}"
        print(f"{job.get('id')!s:<{width}}  {job.get('status')!s:<9}  {job.get('stage') or '-':<9}  {progress:>8}  {job.get('created_at')}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel(args.job_id)
    if args.json:
        _print_json(job, sys.stdout)
    elif job["status"] in ("succeeded", "failed"):
        print(f"{job['id']}: already {job['status']}; nothing to cancel")
    elif job["status"] == "cancelled":
        print(f"{job['id']}: cancelled")
    else:
        print(f"{job['id']}: cancel requested; the running job stops at its next batch")
    return EXIT_OK


def cmd_download(args: argparse.Namespace, client: Client) -> int:
    line = ProgressLine()
    progress = None if args.quiet else _named_progress(line)
    out = Path(args.out)
    if args.names:
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in args.names:
            callback = None if progress is None else (lambda sent, total, _n=name: progress(_n, sent, total))
            paths.append(client.download(args.job_id, name, out / Path(name).name, on_progress=callback))
    else:
        paths = client.download_all(args.job_id, out, on_progress=progress)
    line.done()
    for path in paths:
        print(path)
    return EXIT_OK


# -- parser


def _connection_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("server")
    # Defaults are resolved by Client from the environment at run time, not at parser build time.
    group.add_argument("--url", default=None, help="server URL (default $COMPACTOR_URL or http://127.0.0.1:8000)")
    group.add_argument("--api-key", default=None, help="API key (default $COMPACTOR_API_KEY, which other users cannot see in the process list)")
    group.add_argument("--timeout", type=float, default=120.0, help="seconds per network operation (default 120)")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    return parent


def _runner(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return run_command(command, args)

    return run


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register submit, status, list, cancel and download on ``compactor``'s subparsers."""
    common = [_connection_options()]

    submit = subparsers.add_parser("submit", parents=common, help="upload a model (and dataset) and create a job")
    submit.add_argument("model", metavar="MODEL", help="TorchScript archive, state_dict (.pt) or .safetensors")
    submit.add_argument("--dataset", metavar="FILE", help=".pt dict of tensors or .npz with inputs (and targets)")
    submit.add_argument("--spec", metavar="FILE|JSON", help="job spec: a JSON file or inline JSON text")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish, showing its progress")
    submit.add_argument("--out", metavar="DIR", help="with --wait: download the artifacts here on success")
    submit.add_argument("--idempotency-key", metavar="KEY", help="retrying with the same key returns the same job")
    submit.add_argument("--poll-interval", type=float, default=1.0, help="seconds between status checks (default 1)")
    submit.add_argument("--json", action="store_true", help="print the job document as JSON")
    submit.set_defaults(func=_runner(cmd_submit))

    status = subparsers.add_parser("status", parents=common, help="show a job")
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--json", action="store_true", help="print the job document as JSON")
    status.set_defaults(func=_runner(cmd_status))

    listing = subparsers.add_parser("list", parents=common, help="list jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    listing.add_argument("--limit", type=int, metavar="N", help="show at most N jobs (default all)")
    listing.add_argument("--json", action="store_true", help="print a JSON array of job documents")
    listing.set_defaults(func=_runner(cmd_list))

    cancel = subparsers.add_parser("cancel", parents=common, help="cancel a queued or running job")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--json", action="store_true", help="print the job document as JSON")
    cancel.set_defaults(func=_runner(cmd_cancel))

    download = subparsers.add_parser("download", parents=common, help="download a succeeded job's artifacts")
    download.add_argument("job_id", metavar="JOB_ID")
    download.add_argument("names", metavar="NAME", nargs="*", help="artifacts to fetch (default all)")
    download.add_argument("--out", metavar="DIR", default=".", help="output directory (default .)")
    download.set_defaults(func=_runner(cmd_download))


def run_command(command: Command, args: argparse.Namespace) -> int:
    """Run one command, turning every expected failure into a message and an exit code."""
    # launcher.cli configures INFO logging for its servers; httpx would log every request.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    prog = f"compactor {args.command}" if getattr(args, "command", None) else "compactor"
    try:
        with Client(args.url, args.api_key, timeout=args.timeout) as client:
            return command(args, client)
    except TransportError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_CONNECTION
    except ApiError as exc:
        _print_problem(exc, sys.stderr)
        return EXIT_ERROR
    except ChecksumMismatch as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except CompactorClientError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as exc:
        # A missing model file, an unreadable spec, an output directory we cannot write.
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compactor", description="Client for a Compactor server.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_client_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one client command; returns the exit code (argparse's usage errors included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
