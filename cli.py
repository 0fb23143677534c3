"""`bnserve`: one command line, thin over the modules.

Subcommands import lazily: `serve`, `infer`, `bench`, `health` and `inspect` run on the serving
install (no torch); `train` and `export` need the `train` extra.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _train(args: argparse.Namespace) -> int:
    from bnserve.training import train as T

    momentum = args.bn_momentum
    if args.tf_momentum is not None:
        momentum = T.tf_momentum_to_torch(args.tf_momentum)
        logging.getLogger("bnserve.training").info(
            "--tf-momentum %s (TensorFlow: running = m*running + (1-m)*batch) mapped to "
            "PyTorch momentum %s (running = (1-m)*running + m*batch)",
            args.tf_momentum,
            momentum,
        )
    cfg = T.TrainConfig.for_model(
        args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        bn_momentum=momentum,
        bn_eps=args.bn_eps,
        recalibrate=args.recalibrate,
        threads=args.threads,
        n_train=args.n_train,
    )
    out = args.out or Path("checkpoints") / f"{args.model}.pt"
    if args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1:
        from bnserve.training.distributed import launch

        sync_bn = True if args.sync_bn is None else args.sync_bn
        summary = launch(
            cfg, nproc=args.nproc, out=out, sync_bn=sync_bn, progress=not args.no_progress
        )
        print(
            f"{args.model}: eval accuracy {summary['accuracy']:.4f} on {summary['n_test']} "
            f"test samples; checkpoint {out} ({args.nproc} processes, "
            f"{'SyncBN' if sync_bn else 'per-replica BN'}, median step "
            f"{summary['step_ms_median']:.1f} ms, replicas' running statistics differ by up to "
            f"{summary['replica_spread']:.3g})"
        )
        return 0
    if args.sync_bn:
        logging.getLogger("bnserve.training").info("--sync-bn has no effect with one process")
    result = T.train(cfg, progress=not args.no_progress)
    T.save_checkpoint(out, result)
    print(
        f"{args.model}: eval accuracy {result.accuracy:.4f} on {len(result.split.y_test)} "
        f"test samples; checkpoint {out}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.onnx is None):
        raise ValueError("give either a CHECKPOINT or --onnx MODEL.onnx (one of them)")
    if args.onnx is not None:
        # A network trained elsewhere (tf2onnx, ...): BN folded at the ONNX level.
        import json

        from bnserve.training.onnx_fold import export_onnx_file

        if args.recalibrate:
            raise ValueError("--recalibrate needs a checkpoint (training data), not --onnx")
        path = export_onnx_file(
            args.onnx,
            args.repo,
            name=args.name,
            version=args.version,
            max_batch_size=args.max_batch_size,
        )
        v = json.loads((path.parent.parent / "config.json").read_text())["versions"][
            path.parent.name
        ]
        kept = v["bn_left_unfolded"]
        print(
            f"wrote {path} (version {path.parent.name}); "
            f"{sum(bn['folded'] for bn in v['batchnorm'])} BN folded, {len(kept)} kept"
            f"{' ' + str(kept) if kept else ''}; parity with the unfolded graph "
            f"{v['parity_max_rel_error']}"
        )
        return 0
    from bnserve.training import stats
    from bnserve.training import train as T
    from bnserve.training.repo import write_entry

    model, cfg, ckpt = T.load_checkpoint(args.checkpoint)
    split = T.load_split(cfg.model, n_train=cfg.n_train)
    if args.recalibrate:
        before = T.accuracy(model, split.x_test, split.y_test)
        stats.recalibrate(model, split.x_train)
        after = T.accuracy(model, split.x_test, split.y_test)
        print(f"recalibrated running statistics: eval accuracy {before:.4f} -> {after:.4f}")
    torch_acc = T.accuracy(model, split.x_test, split.y_test)
    path, config = write_entry(
        args.repo,
        model,
        cfg,
        split,
        name=args.name,
        version=args.version,
        torch_accuracy=torch_acc,
        max_batch_size=args.max_batch_size,
        trained_on=ckpt.get("trained_on"),
    )
    v = config["versions"][path.parent.name]
    print(
        f"wrote {path} (version {path.parent.name}); onnxruntime accuracy {v['accuracy']:.4f}, "
        f"torch eval accuracy {torch_acc:.4f}, parity {v['parity_max_rel_error']}"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from bnserve.server.inspect import inspect_model, render

    report = inspect_model(args.model, batch=args.batch)
    print(render(report, as_json=args.json))
    return 0 if report.ok else 1


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from bnserve.server.config import Settings

    # Only flags given on the command line override BNSERVE_* variables and defaults.
    names = (
        "repo",
        "host",
        "port",
        "metrics_host",
        "metrics_port",
        "poll",
        "grace",
        "lame_duck",
        "workers",
        "frontend",
        "instances",
        "max_message_mb",
        "log_level",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "auth_token_file",
        "auth_exempt_health",
        "drift_sample_rate",
    )
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        # One line per problem, named like the flag (the variable is BNSERVE_<NAME>).
        problems = "; ".join(
            f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
            if e["loc"]
            else str(e["msg"]).removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise ValueError(f"invalid settings: {problems}") from None
    logging.getLogger().setLevel(settings.log_level)
    from bnserve.server.frontend import choose

    # Resolved once: --workers' processes inherit "python", not "auto". The front end logs the
    # choice as it starts, after its own checks of the settings.
    frontend, why = choose(settings)
    settings = settings.model_copy(update={"frontend": frontend})
    if frontend == "native":
        from bnserve.server.native_frontend import exec_native

        exec_native(settings, why=why)  # gates the models, then becomes the native server
    if settings.workers > 1:
        from bnserve.server.workers import supervise

        logging.getLogger("bnserve.server").info("front end: python (%s)", why)
        return supervise(settings)  # no grpc, no onnxruntime in this process
    from bnserve.server.app import serve

    return serve(settings, frontend_why=why)


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from bnserve.server.security import read_token_file

    metadata = None
    if args.token_file is not None:
        token = read_token_file(args.token_file, "--token-file")
        metadata = (("authorization", f"Bearer {token}"),)
    options: list[tuple[str, str]] = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together (mutual TLS)")
    if args.tls_ca or args.tls_cert:

        def pem(path: Path | None, flag: str) -> bytes | None:
            try:
                return None if path is None else path.read_bytes()
            except OSError as exc:
                raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None

        creds = grpc.ssl_channel_credentials(
            pem(args.tls_ca, "--tls-ca"),
            pem(args.tls_key, "--tls-key"),
            pem(args.tls_cert, "--tls-cert"),
        )
        channel = grpc.secure_channel(args.target, creds, options=options)
    else:
        channel = grpc.insecure_channel(args.target, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                metadata=metadata,
            )
        except grpc.RpcError as exc:
            print(f"{args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnserve", description="Train, freeze, fold, export and serve BN networks."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a BN network (digits, vol3d, mlp)")
    p.add_argument("model", choices=["digits", "vol3d", "mlp"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (one-cycle Adam)")
    p.add_argument("--seed", type=int, default=0)
    m = p.add_mutually_exclusive_group()
    m.add_argument(
        "--bn-momentum",
        type=float,
        help="PyTorch convention: weight of the new batch (default 0.1; vol3d 0.01)",
    )
    m.add_argument(
        "--tf-momentum",
        type=float,
        help="TensorFlow/Keras convention: weight of the old average (0.99 = 0.01)",
    )
    p.add_argument(
        "--bn-eps",
        type=float,
        default=1e-5,
        help="added to the variance (PyTorch 1e-5; Keras' default is 1e-3)",
    )
    p.add_argument(
        "--recalibrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute running statistics over the training set (precise BN)",
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads (fixed = reproducible)")
    p.add_argument("--n-train", type=int, help="vol3d: number of generated training volumes")
    p.add_argument("--out", type=Path, help="checkpoint path (default checkpoints/MODEL.pt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes (DDP over gloo via torchrun, 1 thread each unless "
        "--threads); --batch-size stays the GLOBAL batch, split across them",
    )
    p.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="BN statistics over the whole global batch (default with --nproc > 1); "
        "--no-sync-bn: each process normalizes with its own shard's statistics",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="fold, export to ONNX, verify, write a repository entry")
    p.add_argument("checkpoint", type=Path, nargs="?", help="a `bnserve train` checkpoint")
    p.add_argument(
        "--onnx",
        type=Path,
        metavar="MODEL.onnx",
        help="instead of a checkpoint: an ONNX model trained elsewhere (tf2onnx, ...); its "
        "BatchNormalization nodes are folded into the Conv/ConvTranspose/Gemm/MatMul before them",
    )
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument(
        "--name",
        help="model name in the repository (default: the checkpoint's model, or the file's stem)",
    )
    p.add_argument("--version", type=int, help="version number (default: the next one)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="recompute running statistics over the training set before freezing",
    )
    p.set_defaults(func=_export)

    p = sub.add_parser("inspect", help="inputs/outputs, ops, BN nodes, batch invariance")
    p.add_argument("model", type=Path, help="an .onnx file")
    p.add_argument("--batch", type=int, default=8, help="batch size of the invariance check")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("serve", help="serve a model repository over gRPC (Open Inference Protocol)")
    p.add_argument("--repo", type=Path, help="model repository (default model_repository)")
    p.add_argument("--host", help="bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="gRPC port (default 8001; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002; -1 = off)")
    p.add_argument("--poll", type=float, help="rescan the repository every SECONDS (hot reload)")
    p.add_argument("--grace", type=float, help="seconds in-flight requests get at shutdown (10)")
    p.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port (SO_REUSEPORT), each with every model; "
        "metrics of worker i on --metrics-port + i (1)",
    )
    p.add_argument(
        "--frontend",
        choices=("auto", "python", "native"),
        help="native: the C++ front end, several times less CPU a request, no hot "
        "reload/tokens/drift/--workers/--lame-duck yet (`make native` builds it); python: every "
        "feature; auto (default): native when built and every flag given is one it supports, "
        "else python, saying why in the log",
    )
    p.add_argument(
        "--lame-duck",
        type=float,
        help="seconds after SIGTERM during which new calls still get UNAVAILABLE before the "
        "port closes, within --grace (0: close once drained)",
    )
    p.add_argument("--instances", type=int, help="onnxruntime sessions per model (CPU count)")
    p.add_argument("--max-message-mb", type=int, help="gRPC message size limit in MiB (64)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--metrics-host", help="metrics bind address (default: --host)")
    p.add_argument("--tls-cert", type=Path, help="server certificate chain, PEM: serve TLS")
    p.add_argument("--tls-key", type=Path, help="server private key, PEM (with --tls-cert)")
    p.add_argument(
        "--tls-client-ca", type=Path, help="CA of client certificates, PEM: require mutual TLS"
    )
    p.add_argument(
        "--auth-token-file",
        type=Path,
        help="file holding a bearer token: calls without `authorization: Bearer <token>` "
        "get UNAUTHENTICATED",
    )
    p.add_argument(
        "--auth-exempt-health",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="grpc.health.v1.Health needs no token (Kubernetes gRPC probes; default off)",
    )
    p.add_argument(
        "--drift-sample-rate",
        type=float,
        metavar="R",
        help="score a fraction R of the batches for drift against the BN statistics, "
        "gauge bnserve_bn_drift (docs/drift.md; default 0 = off)",
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser("health", help="grpc.health.v1 probe: exit 0 when SERVING")
    p.add_argument("--target", default="127.0.0.1:8001", help="HOST:PORT")
    p.add_argument("--service", default="", help="a model name; empty = the whole server")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    p.add_argument("--tls-ca", type=Path, help="CA certificates, PEM: connect with TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate, PEM (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="client private key, PEM (mutual TLS)")
    p.add_argument("--tls-server-name", help="name to verify in the server's certificate")
    p.add_argument("--token-file", type=Path, help="file holding the server's bearer token")
    p.set_defaults(func=_health)

    # >>> infer subcommand (owned by the client library's author)
    def _infer(args: argparse.Namespace) -> int:
        from bnserve.client.infer import run

        return run(args)

    p = sub.add_parser(
        "infer", help="classify .npy/.npz/image files on a server, or --demo the digits test set"
    )
    p.add_argument("files", nargs="*", type=Path, help=".npy, .npz or image files")
    p.add_argument(
        "--target",
        action="append",
        metavar="HOST:PORT",
        help="server address (default 127.0.0.1:8001); repeat or comma-separate for round robin",
    )
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--model-version", help="model version (default: the server's choice)")
    p.add_argument("--top-k", type=int, default=3, help="labels printed per sample (3)")
    p.add_argument("--config", type=Path, help="local config.json: labels and preprocessing")
    p.add_argument("--demo", action="store_true", help="stream the digits test set: accuracy")
    p.add_argument("--batch-size", type=int, default=16, help="--demo: rows per request (16)")
    p.add_argument("--window", type=int, default=16, help="--demo: requests in flight (16)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (30)")
    p.add_argument("--retries", type=int, default=3, help="retries after UNAVAILABLE (3)")
    p.add_argument("--token", help="bearer token (default: $BNSERVE_TOKEN)")
    p.add_argument("--tls-ca", type=Path, help="CA certificates: connect with TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="client private key (mutual TLS)")
    p.add_argument("--tls-server-name", help="name to verify in the server's certificate")
    p.set_defaults(func=_infer)
    # <<< infer subcommand

    def _drift(args: argparse.Namespace) -> int:
        from bnserve.client.drift import run

        return run(args)

    p = sub.add_parser(
        "drift", help="per-layer BN drift scores of a server (ModelStatistics or /metrics)"
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--target",
        default="127.0.0.1:8001",
        help="the server's gRPC address, read through ModelStatistics (default 127.0.0.1:8001)",
    )
    source.add_argument(
        "--metrics-url",
        help="read the Prometheus endpoint instead, e.g. http://127.0.0.1:8002/metrics",
    )
    p.add_argument("--model", help="only this model (default: all)")
    p.add_argument(
        "--threshold",
        type=float,
        help="flag layers above this score and exit 2 (docs/drift.md suggests one)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (5)")
    p.set_defaults(func=_drift)

    # >>> bench subcommand (owned by the load tester's author)
    def _bench(args: argparse.Namespace) -> int:
        from bnserve.client.bench import main as bench_main

        return bench_main(args)

    p = sub.add_parser(
        "bench",
        help="load test a model over gRPC: throughput, latency percentiles, errors by code",
    )
    p.add_argument(
        "--target",
        action="append",
        metavar="HOST:PORT",
        help="server address (default 127.0.0.1:8001); repeat for round robin, one channel each",
    )
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--model-version", default="", help="model version (default: the server's)")
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency", type=int, help="closed loop: N workers, one request in flight each (1)"
    )
    load.add_argument(
        "--rate",
        type=float,
        help="open loop: R requests/s on a fixed schedule; latency from the scheduled time",
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before, not counted (1)")
    p.add_argument("--batch", type=int, default=1, help="rows per request (1)")
    p.add_argument("--mode", choices=["unary", "stream"], default="unary")
    p.add_argument("--streams", type=int, help="stream mode: ModelStreamInfer streams (1/target)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, s (10)")
    p.add_argument(
        "--max-inflight", type=int, default=10_000, help="open loop: in-flight cap (10000)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        help="re-send a request failed with UNAVAILABLE to the next target, up to N times (0)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")
    p.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="latency histogram + throughput over time"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--input-npy", type=Path, metavar="FILE", help="rows of the input from a .npy (cycled)"
    )
    p.add_argument(
        "--drift-input",
        choices=["noise", "shift", "contrast"],
        help="drifted traffic: + N(0, 0.5), roll by 2 pixels, or 1 - x (docs/drift.md)",
    )
    p.set_defaults(func=_bench)
    # <<< bench subcommand
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        # Our errors (StatisticsError, FoldError, ExportError, ...) carry the whole story.
        print(f"bnserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
