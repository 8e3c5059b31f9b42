"""The ``compactor`` command.

    compactor serve   [--host 127.0.0.1] [--port 8000] [--data-dir DIR] [--workers N | --gpus 0,1] [--insecure]
    compactor gateway [--host ...] [--port ...] [--data-dir DIR] [--insecure]
    compactor worker  [--gpu N] [--concurrency 1] [--data-dir DIR] [--name NAME]
    compactor submit|status|list|cancel|download ...   (client commands, when installed)

``serve`` is the embedded default: one process tree (see ``launcher.processes``)
with the gateway and N solo-pool workers, the filesystem broker, the SQLite job
store and artifacts under the data directory. ``gateway`` and ``worker`` are the
distributed topology's two halves (``COMPACTOR_BROKER_URL`` / ``COMPACTOR_STORE_URL``
pointing at Redis). Configuration is by environment (``COMPACTOR_*``); options
given here are written into the environment so that child processes see them too.

Nothing here imports torch: the worker's parent must not touch CUDA before
``CUDA_VISIBLE_DEVICES`` is set, and the gateway never loads it at all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("compactor")

EXIT_USAGE = 2
# What a `worker.celery_app` process is for: "notifier" skips loading the compression core.
WORKER_ROLE_ENV = "COMPACTOR_WORKER_ROLE"


def _apply_environment(args: argparse.Namespace) -> None:
    """Options → COMPACTOR_* variables, so Settings here and in every child agree."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir:
        os.environ["COMPACTOR_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())
    elif "COMPACTOR_DATA_DIR" in os.environ:
        # Children may start in another directory: pin a relative path now.
        os.environ["COMPACTOR_DATA_DIR"] = str(Path(os.environ["COMPACTOR_DATA_DIR"]).expanduser().resolve())
    for name in ("host", "port"):
        value = getattr(args, name, None)
        if value is not None:
            os.environ[f"COMPACTOR_{name.upper()}"] = str(value)
    if getattr(args, "insecure", False):
        os.environ["COMPACTOR_INSECURE"] = "true"
    from compactor.settings import get_settings

    get_settings.cache_clear()


def _configure_logging() -> None:
    from compactor.logs import configure_logging
    from compactor.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)


def _check_bind(settings: object) -> str | None:
    """The refusal message when open mode would listen beyond loopback, else None."""
    from service.auth import check_bind_allowed

    try:
        check_bind_allowed(settings)  # type: ignore[arg-type]
    except RuntimeError as exc:
        return str(exc)
    except ValueError as exc:  # malformed COMPACTOR_API_KEYS / key file
        return f"invalid API key configuration: {exc}"
    return None


# -- serve


def _requeue_unfinished() -> int:
    """Enqueue every queued or running job again: a stop (or crash) lost their messages.

    Duplicates are harmless: a delivery whose job is finished or leased by a live
    attempt does nothing; a job left running by a killed worker is claimed once its
    lease runs out (the reaper re-queues it)."""
    from compactor.queue import CeleryJobQueue
    from compactor.settings import get_settings
    from compactor.store import open_store

    settings = get_settings()
    store = open_store(settings.effective_store_url)
    queue = CeleryJobQueue(settings)
    try:
        jobs = store.unfinished_jobs()
        for job in jobs:
            queue.enqueue(job.id, job.attempts + 1)
        return len(jobs)
    finally:
        queue.close()
        store.close()


def _self_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


def _fresh_metrics_dir(path: Path) -> None:
    """One Prometheus multiprocess directory for the whole tree: the gateway's /metrics then sums
    every process's series (the workers' job and stage durations included). Emptied at each start:
    series of a previous run must not add up with this one's."""
    import shutil

    from compactor.metrics import MULTIPROC_ENV

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from compactor.settings import get_settings
    from launcher.processes import ChildSpec, Supervisor

    _apply_environment(args)
    settings = get_settings()
    refusal = _check_bind(settings)
    if refusal:
        print(f"compactor serve: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    gpus = [gpu.strip() for gpu in args.gpus.split(",") if gpu.strip()] if args.gpus else []
    if any(not gpu.isdigit() for gpu in gpus):
        print("compactor serve: --gpus takes GPU indices, e.g. --gpus 0,1", file=sys.stderr)
        return EXIT_USAGE
    if gpus:
        # One worker process per GPU, each seeing only its own device.
        args.workers = len(gpus)
    if args.workers < 1:
        print("compactor serve: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    # Every child must use this very directory, whatever directory it starts in.
    os.environ["COMPACTOR_DATA_DIR"] = str(settings.resolved_data_dir)
    try:
        requeued = _requeue_unfinished()
    except Exception as exc:  # noqa: BLE001 - a store or broker that cannot be reached: say so, exit
        print(f"compactor serve: cannot reach the job store or broker: {exc}", file=sys.stderr)
        return 1
    if requeued:
        log.info("re-enqueued %d unfinished job(s) from the last run", requeued)

    _fresh_metrics_dir(settings.resolved_data_dir / "prometheus")

    gateway = ["gateway", "--host", settings.host, "--port", str(settings.port)]
    if settings.insecure:
        gateway.append("--insecure")
    env = dict(os.environ)
    # The gateway shares this machine's cores with training: workers yield the CPU to it.
    env.setdefault("COMPACTOR_WORKER_NICE", "10")
    if "COMPACTOR_TORCH_THREADS" not in env:
        # One machine shared by the gateway and the workers: keep a core for the gateway.
        env["COMPACTOR_TORCH_THREADS"] = str(max(1, ((os.cpu_count() or 2) - 1) // args.workers))
    specs = [ChildSpec("gateway", _self_command(*gateway), env, restart=False)]
    # Job-end webhooks have their own light consumer, so a delivery never waits behind a job.
    specs.append(ChildSpec("notifier", _self_command("notifier", "--name", "notifier@%h"), env))
    for index in range(1, args.workers + 1):
        worker = ["worker", "--name", f"worker{index}@%h"]
        if gpus:
            worker += ["--gpu", gpus[index - 1]]
        specs.append(ChildSpec(f"worker{index}", _self_command(*worker), env))
    log.info("serving on http://%s:%d with %d worker(s); data in %s", settings.host, settings.port, args.workers, settings.resolved_data_dir)
    return Supervisor(specs, stop_timeout=args.stop_timeout).run()


# -- gateway


def cmd_gateway(args: argparse.Namespace) -> int:
    from launcher.processes import bind_to_parent

    bind_to_parent()
    _apply_environment(args)
    from compactor.settings import get_settings

    settings = get_settings()
    refusal = _check_bind(settings)
    if refusal:
        print(f"compactor gateway: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    import uvicorn

    from service.app import create_app
    from service.http_limits import gateway_http_protocol

    app = create_app(settings)
    # Drain in-flight requests for a bounded time on SIGTERM; an upload must not block a stop.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        # httptools with a bound on the request head (httptools alone has none).
        http=gateway_http_protocol(),
        timeout_graceful_shutdown=10,
        # None: uvicorn's loggers go through the root handler, in the format of COMPACTOR_LOG_FORMAT.
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
    )
    return 0


# -- worker


def cmd_worker(args: argparse.Namespace) -> int:
    from launcher.processes import bind_to_parent

    bind_to_parent()
    if args.concurrency < 1:
        print("compactor worker: --concurrency must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.gpu is not None:
        if args.concurrency != 1:
            print("compactor worker: a GPU worker runs one job at a time (--concurrency 1)", file=sys.stderr)
            return EXIT_USAGE
        # Before anything can import torch: this process sees exactly one GPU, as cuda:0.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
        from worker.runtime import WORKER_DEVICE_ENV

        os.environ[WORKER_DEVICE_ENV] = "cuda"
    _apply_environment(args)
    from compactor.settings import get_settings

    settings = get_settings()
    if settings.worker_nice:
        os.nice(settings.worker_nice)  # before torch starts its threads: they inherit it
    name = args.name or (f"gpu{args.gpu}@%h" if args.gpu is not None else f"compactor-{os.getpid()}@%h")
    from worker.celery_app import app

    if args.metrics_port is not None:
        from worker.metrics import serve_metrics

        serve_metrics(args.metrics_port)
    # solo: the job runs in this process, so CUDA is initialised in exactly one place.
    # prefork (CPU-only, --concurrency > 1): the parent never imports torch, children do.
    pool = "solo" if args.concurrency == 1 else "prefork"
    return _run_celery_worker(app, args.loglevel, pool, args.concurrency, settings.queue_name, name)


def _run_celery_worker(app: Any, loglevel: str, pool: str, concurrency: int, queue: str, hostname: str) -> int:
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--queues={queue}",
        f"--hostname={hostname}",
        # No cluster chatter at start-up (mingle waits for replies) or per second (gossip,
        # event heartbeats): the store, not the broker, tracks who is alive.
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]
    try:
        app.worker_main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0


# -- notifier


def cmd_notifier(args: argparse.Namespace) -> int:
    """The consumer of job-end webhooks (``compactor.notify_job``): a thread pool that only
    makes HTTP calls, never loads torch, and so runs beside the gateway or on any host."""
    from launcher.processes import bind_to_parent

    bind_to_parent()
    if args.concurrency < 1:
        print("compactor notifier: --concurrency must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    os.environ[WORKER_ROLE_ENV] = "notifier"
    _apply_environment(args)
    from compactor.queue import notify_queue_name
    from compactor.settings import get_settings
    from worker.celery_app import app

    settings = get_settings()
    name = args.name or f"notifier-{os.getpid()}@%h"
    return _run_celery_worker(app, args.loglevel, "threads", args.concurrency, notify_queue_name(settings), name)


# -- parser


def _add_client_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # The HTTP client commands live in another module that may not be installed.
    try:
        module = importlib.import_module("compactor.client_cli")
    except ModuleNotFoundError as exc:
        if exc.name != "compactor.client_cli":
            raise
        return
    module.add_client_commands(subparsers)


def _default_host() -> str:
    return os.environ.get("COMPACTOR_HOST", "127.0.0.1")


def _default_port() -> int:
    return int(os.environ.get("COMPACTOR_PORT", "8000"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compactor", description="Compress PyTorch models behind a REST API.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def listen_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", default=_default_host(), help="address to listen on (default 127.0.0.1)")
        sub.add_argument("--port", type=int, default=_default_port(), help="port to listen on (default 8000)")
        sub.add_argument(
            "--insecure",
            action="store_true",
            help="allow listening on a non-loopback address with no API keys configured",
        )

    def data_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--data-dir", help="broker folders, job store and artifacts (default $COMPACTOR_DATA_DIR or ./compactor-data)")

    serve = subparsers.add_parser("serve", help="gateway + workers in one process tree (embedded default)")
    listen_options(serve)
    data_option(serve)
    serve.add_argument("--workers", type=int, default=1, help="worker processes, one job each at a time (default 1)")
    serve.add_argument("--gpus", help="comma-separated GPU indices: one worker per GPU (overrides --workers), e.g. 0,1")
    serve.add_argument("--stop-timeout", type=float, default=30.0, help="seconds children get to stop before they are killed")
    serve.set_defaults(func=cmd_serve)

    gateway = subparsers.add_parser("gateway", help="the HTTP gateway alone (distributed topology)")
    listen_options(gateway)
    data_option(gateway)
    gateway.set_defaults(func=cmd_gateway)

    worker = subparsers.add_parser("worker", help="one worker process (distributed topology)")
    data_option(worker)
    worker.add_argument("--gpu", type=int, help="run on this GPU only (sets CUDA_VISIBLE_DEVICES)")
    worker.add_argument("--concurrency", type=int, default=1, help="jobs at once; >1 uses a CPU-only prefork pool")
    worker.add_argument("--name", help="Celery node name (default compactor-<pid>@<host>)")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--metrics-port", type=int, help="serve this worker's Prometheus /metrics on this port (a host of its own)")
    worker.set_defaults(func=cmd_worker)

    notifier = subparsers.add_parser("notifier", help="the job-end webhook sender (no torch; one per deployment or more)")
    data_option(notifier)
    notifier.add_argument("--concurrency", type=int, default=8, help="deliveries in flight at once (threads)")
    notifier.add_argument("--name", help="Celery node name (default notifier-<pid>@<host>)")
    notifier.add_argument("--loglevel", default="INFO")
    notifier.set_defaults(func=cmd_notifier)

    _add_client_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in {"serve", "gateway", "worker", "notifier"}:
        # Services log; client commands print their results and keep stderr for errors.
        _configure_logging()
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
