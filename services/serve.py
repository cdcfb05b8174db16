"""`pdserve serve`: starts Ray (or joins one), the worker pools and the router's gRPC and HTTP servers.

Health turns SERVING once every worker is up. SIGINT/SIGTERM: health goes NOT_SERVING, new
requests are refused, in-flight ones drain (up to --drain-timeout-s), then the servers stop and
the actors this command started are killed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.config_flags import ConfigFlags
from services.engine.config import DEVICES, CacheConfig, EngineConfig, SchedulerConfig
from services.env import ENV
from services.router.auth import API_KEYS_ENV, Security, SecurityConfigError
from services.router.config import RouterConfig
from services.transfer.config import TransferConfig

if TYPE_CHECKING:
    from services.router.pool import PoolSpec

log = logging.getLogger("pdserve.serve")

# The flags of each config dataclass (defaults and help on its fields); the fields left out are set here.
ENGINE_FLAGS = ConfigFlags(EngineConfig, exclude=("model", "device", "cache", "scheduler", "num_threads",
                                                  "single_row_threads"))
CACHE_FLAGS = ConfigFlags(CacheConfig, exclude=("enable_prefix_caching",))
SCHEDULER_FLAGS = ConfigFlags(SchedulerConfig)
ROUTER_FLAGS = ConfigFlags(RouterConfig, exclude=("max_request_bytes",))
TRANSFER_FLAGS = ConfigFlags(TransferConfig, prefix="transfer-", exclude=("port", "ucx_tls"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_server_arguments(parser)
    ENGINE_FLAGS.add_to(parser.add_argument_group("engine"))
    CACHE_FLAGS.add_to(parser.add_argument_group("KV cache"))
    SCHEDULER_FLAGS.add_to(parser.add_argument_group("scheduler"))
    ROUTER_FLAGS.add_to(parser.add_argument_group("router"))
    TRANSFER_FLAGS.add_to(parser.add_argument_group("KV transfer"))


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the server itself, which no config dataclass holds."""
    parser.add_argument("--model", default=None, help="model directory (default: the built-in tiny model)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="the name(s) clients use for the model; the first is the main one "
                        "(default: the model directory's name)")
    parser.add_argument("--chat-template", default=None, metavar="FILE|STRING",
                        help="a Jinja chat template (a file, or the template itself) instead of the model's own")
    parser.add_argument("--prefill-workers", type=int, default=1, help="prefill workers (default: 1)")
    parser.add_argument("--decode-workers", type=int, default=1,
                        help="decode workers, or colocated workers in colocated mode (default: 1)")
    parser.add_argument("--host", default=ENV.host,
                        help="address the gRPC and HTTP servers listen on; 0.0.0.0 for every interface "
                        "(default: $PDSERVE_HOST if set, which the Docker images set to 0.0.0.0, else 127.0.0.1)")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (default: 50051)")
    parser.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible API and /metrics; 0 disables")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--device", choices=DEVICES, default=None, help="default: cuda when available")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="default: the cores shared out evenly")
    parser.add_argument("--cpu-bind", choices=("auto", "none"), default="auto",
                        help="on CPU with a local Ray: bind each worker to cores of its own, and the router with "
                             "Ray to the prefill workers' (auto, the default, unless --cpus-per-worker is given "
                             "or there are more workers than cores); none: every process may run on every core")
    parser.add_argument("--worker-group-resources", action="store_true",
                        help="place prefill/decode actors on Ray nodes that advertise a 'prefill'/'decode' resource "
                        "(KubeRay worker groups)")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0,
                        help="how long in-flight requests may take to finish on SIGTERM (default: 30)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    _add_security_arguments(parser.add_argument_group("security (API keys and TLS, for gRPC and HTTP alike)"))


def _add_security_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--api-key", action="append", default=None, metavar="KEY",
                       help="accept this key as 'Authorization: Bearer KEY' (repeatable; visible in the process "
                       f"list, so prefer --api-key-file or ${API_KEYS_ENV}, comma-separated). Any key turns "
                       "authentication on")
    group.add_argument("--api-key-file", default=None, metavar="FILE",
                       help="a file of API keys, one per line (blank lines and # comments are skipped)")
    group.add_argument("--auth-all-endpoints", action="store_true",
                       help="require the key on health checks (HTTP /health, grpc.health.v1), /metrics, /version "
                       "and gRPC reflection too; without it they stay open to probes and scrapers")
    group.add_argument("--tls-cert", default=None, metavar="FILE", help="PEM certificate chain: serve TLS on "
                       "both ports (with --tls-key)")
    group.add_argument("--tls-key", default=None, metavar="FILE", help="PEM private key of --tls-cert")
    group.add_argument("--tls-client-ca", default=None, metavar="FILE",
                       help="PEM CA certificate(s): require client certificates signed by them (mutual TLS)")


@dataclass
class Service:
    """The running router with its pools; stop() undoes start()."""

    args: argparse.Namespace

    async def start(self) -> None:
        from services.engine.model_config import load_model_config
        from services.engine.tokenizer import Tokenizer
        from services.modelgen.default_model import resolve_model
        from services.router.grpc_server import GenerationServicer, build_server
        from services.router.metrics import Metrics
        from services.router.router import Router

        a = self.args
        security = security_from_args(a)  # before anything starts: a bad flag fails at once
        a.model = resolve_model(a.model)
        engine = engine_config(a, a.device or _available_device())
        model = load_model_config(a.model)
        names = a.served_model_name or [model.name]
        router = router_config(a)
        self.metrics = Metrics(model_name=names[0], slo_ttft_ms=router.slo_ttft_ms, slo_tpot_ms=router.slo_tpot_ms)
        num_workers = self._start_pools(engine)
        self.tokenizer = Tokenizer(a.model, chat_template=a.chat_template)
        defaults = model.generation_defaults if engine.generation_config == "auto" else {}
        self.router = Router(router, self.pools, self.tokenizer, self.metrics, model.vocab_size,
                             model.context_len(engine.max_model_len), engine.block_size, defaults)
        eos = model.eos_token_ids[0] if model.eos_token_ids else 0
        servicer = GenerationServicer(self.router, names[0], engine.torch_dtype_name, eos)
        grpc_server = build_server(servicer, a.host, a.grpc_port, security)
        self.grpc_server, self.health, self.grpc_port = grpc_server.server, grpc_server.health, grpc_server.port
        self.http = None
        await self._set_health(False)
        await self.grpc_server.start()
        if a.http_port:
            from services.router.http_server import HttpServer

            self.http = HttpServer(self.router, self.metrics, self.tokenizer, names, a.host, a.http_port, security)
            await self.http.start()
        log.info("%s", security.describe())
        log.info("gRPC on %s:%d; waiting for %d workers", a.host, self.grpc_port, num_workers)
        await self.pools.wait_ready()
        await self._set_health(True)
        log.info("pdserve is SERVING (%s mode, model %s as %s)", a.mode, model.path, ", ".join(names))

    def _start_pools(self, engine: EngineConfig) -> int:
        """Starts Ray (or joins the cluster at --ray-address) and the worker pools; returns how many workers."""
        import ray

        from services.router.pool import PoolSpec, WorkerPools

        a = self.args
        colocated = a.mode == "colocated"
        num_workers = a.decode_workers + (0 if colocated else a.prefill_workers)
        cores = os.cpu_count() or 1
        cpus = a.cpus_per_worker or max(cores / num_workers, 1.0) if engine.device == "cpu" else 1.0
        bind = a.cpu_bind == "auto" and engine.device == "cpu" and not a.ray_address and not a.cpus_per_worker
        spec = PoolSpec(a.prefill_workers, a.decode_workers, colocated, cpus_per_worker=cpus,
                        gpus_per_worker=1.0 if engine.device == "cuda" else 0.0,
                        worker_groups=a.worker_group_resources, shared=bool(a.ray_address),
                        cpu_cores=tuple(sorted(os.sched_getaffinity(0))) if bind else None)
        self._bind_router(spec)
        self.started_ray = False
        if a.ray_address:
            ray.init(address=a.ray_address, namespace="pdserve", log_to_driver=True)
        else:
            ray.init(address="local", num_cpus=max(cores, num_workers), include_dashboard=False, log_to_driver=True)
            self.started_ray = True
        self.pools = WorkerPools(engine, transfer_config(a), spec, self.metrics)
        self.pools.start()
        return num_workers

    @staticmethod
    def _bind_router(spec: PoolSpec) -> None:
        """With --cpu-bind auto, runs this process, and the Ray daemons it starts, on the decode workers' cores
        (services/worker/cores.py); the workers bind themselves as they start."""
        from services.router.pool import plan_workers
        from services.worker.cores import bind_process, router_cores

        slots = plan_workers(spec, [])
        if not slots or slots[0].cores is None:
            return
        cores = router_cores([slot.cores or () for slot in slots], [slot.role for slot in slots])
        bind_process(cores)
        log.info("cores: the router and Ray on %s; %s", list(cores),
                 "; ".join(f"{slot.name} on {list(slot.cores or ())}" for slot in slots))

    async def _set_health(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", "pdserve.v1.Generation"):
            await self.health.set(name, status)
        if self.http is not None:
            self.http.ready = serving

    async def stop(self, drain_timeout_s: float) -> None:
        import ray

        await self._set_health(False)
        self.router.draining = True
        if self.http is not None:
            self.http.draining = True
        deadline = asyncio.get_running_loop().time() + drain_timeout_s
        while self.router.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await self.grpc_server.stop(grace=1.0)
        if self.http is not None:
            await self.http.stop()
        await self.pools.stop()
        if self.started_ray:
            ray.shutdown()


def _available_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def engine_config(a: argparse.Namespace, device: str) -> EngineConfig:
    """The workers' engine config from the parsed flags (`a.model` already resolved); flags that do not go
    together exit with the reason (no traceback, nothing started)."""
    try:
        return ENGINE_FLAGS.build(a, model=a.model, device=device, cache=CACHE_FLAGS.build(a),
                                  scheduler=SCHEDULER_FLAGS.build(a))
    except ValueError as e:
        raise SystemExit(f"pdserve serve: error: {e}") from None


def transfer_config(a: argparse.Namespace) -> TransferConfig:
    return TRANSFER_FLAGS.build(a)


def router_config(a: argparse.Namespace) -> RouterConfig:
    return ROUTER_FLAGS.build(a)


def security_from_args(a: argparse.Namespace) -> Security:
    """API keys and TLS from the flags; a wrong flag exits with its message (no traceback, nothing started)."""
    try:
        return Security.from_flags(a.api_key, a.api_key_file, a.auth_all_endpoints, a.tls_cert, a.tls_key,
                                   a.tls_client_ca)
    except SecurityConfigError as e:
        raise SystemExit(f"pdserve serve: error: {e}") from None


async def serve(args: argparse.Namespace) -> None:
    service = Service(args)
    stop = asyncio.Event()
    await service.start()
    # After ray.init, which installs handlers of its own that would skip the drain.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining")
    await service.stop(args.drain_timeout_s)
    log.info("stopped")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0
