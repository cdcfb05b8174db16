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

from services.engine.config import CacheConfig, EngineConfig, SchedulerConfig

if TYPE_CHECKING:
    from services.router.config import RouterConfig
    from services.transfer.config import TransferConfig

log = logging.getLogger("pdserve.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory (default: the built-in tiny model)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="the name(s) clients use for the model; the first is the main one "
                        "(default: the model directory's name)")
    parser.add_argument("--generation-config", choices=["auto", "vllm"], default="auto",
                        help="auto: the model's generation_config.json gives the defaults for sampling fields a "
                        "request leaves out; vllm: it does not (pdserve's own defaults apply)")
    parser.add_argument("--chat-template", default=None, metavar="FILE|STRING",
                        help="a Jinja chat template (a file, or the template itself) instead of the model's own")
    parser.add_argument("--mode", choices=["disagg", "colocated"], default="disagg")
    parser.add_argument("--prefill-workers", type=int, default=1)
    parser.add_argument("--decode-workers", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible API and /metrics; 0 disables")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache per worker, MiB")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (overrides --kv-cache-mb)")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--no-chunked-prefill", action="store_true")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--prefill-policy", default="prefix_affinity")
    parser.add_argument("--decode-policy", default="least_loaded")
    parser.add_argument("--local-prefill-threshold", type=int, default=32,
                        help="prefill on the decode worker when the uncached prompt part is shorter than this")
    parser.add_argument("--lease-s", type=float, default=30.0, help="decode reservation lease")
    parser.add_argument("--transfer-timeout-s", type=float, default=30.0)
    parser.add_argument("--transfer-failure-policy", choices=["recompute", "fail"], default="recompute")
    parser.add_argument(
        "--transfer-staging-mib", type=int, default=256,
        help="each prefill worker's staging ring for host KV (shared memory); 0 registers tensors in place",
    )
    parser.add_argument(
        "--transfer-spin-us", type=int, default=200,
        help="how long a decode worker polls for a request's next KV layer before sleeping; 0 never polls",
    )
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="default: the cores shared out evenly")
    parser.add_argument("--worker-group-resources", action="store_true",
                        help="place prefill/decode actors on Ray nodes that advertise a 'prefill'/'decode' resource "
                        "(KubeRay worker groups)")
    parser.add_argument("--default-max-tokens", type=int, default=16, help="max_tokens when a gRPC request sets none")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0)
    parser.add_argument("--log-level", default="INFO")


@dataclass
class Service:
    """The running router with its pools; stop() undoes start()."""

    args: argparse.Namespace

    async def start(self) -> None:
        import ray
        import torch

        from services.engine.model_config import load_model_config
        from services.engine.tokenizer import Tokenizer
        from services.router.grpc_server import GenerationServicer, build_server
        from services.router.metrics import Metrics
        from services.router.pool import PoolSpec, WorkerPools
        from services.router.router import Router

        a = self.args
        if a.model is None:
            from services.engine.make_model import default_model_dir

            a.model = str(default_model_dir())
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        colocated = a.mode == "colocated"
        num_workers = a.decode_workers + (0 if colocated else a.prefill_workers)
        cores = os.cpu_count() or 1
        self.started_ray = False
        if a.ray_address:
            ray.init(address=a.ray_address, log_to_driver=True)
        else:
            ray.init(num_cpus=max(cores, num_workers), include_dashboard=False, log_to_driver=True)
            self.started_ray = True
        cpus = a.cpus_per_worker or max(cores / num_workers, 1.0) if device == "cpu" else 1.0
        engine = _engine_config(a, device)
        model = load_model_config(a.model)
        names = a.served_model_name or [model.name]
        self.metrics = Metrics(model_name=names[0], slo_ttft_ms=a.slo_ttft_ms, slo_tpot_ms=a.slo_tpot_ms)
        spec = PoolSpec(a.prefill_workers, a.decode_workers, colocated, cpus_per_worker=cpus,
                        gpus_per_worker=1.0 if device == "cuda" else 0.0,
                        resources={"prefill": 1.0, "decode": 1.0} if a.worker_group_resources else {})
        self.pools = WorkerPools(engine, _transfer_config(a), spec, self.metrics)
        self.pools.start()
        max_len = min(model.max_model_len, a.max_model_len or model.max_model_len)
        self.tokenizer = Tokenizer(a.model, chat_template=a.chat_template)
        defaults = model.generation_defaults if a.generation_config == "auto" else {}
        self.router = Router(_router_config(a), self.pools, self.tokenizer, self.metrics,
                             model.vocab_size, max_len, a.block_size, defaults)
        eos = model.eos_token_ids[0] if model.eos_token_ids else 0
        servicer = GenerationServicer(self.router, names[0], engine.torch_dtype_name, eos)
        self.grpc_server, self.health, self.grpc_port = build_server(servicer, a.host, a.grpc_port)
        self.http = None
        await self._set_health(False)
        await self.grpc_server.start()
        if a.http_port:
            from services.router.http_server import HttpServer

            self.http = HttpServer(self.router, self.metrics, self.tokenizer, names, a.host, a.http_port)
            await self.http.start()
        log.info("gRPC on %s:%d; waiting for %d workers", a.host, self.grpc_port, num_workers)
        await self.pools.wait_ready()
        await self._set_health(True)
        log.info("pdserve is SERVING (%s mode, model %s as %s)", a.mode, model.path, ", ".join(names))

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


def _engine_config(a: argparse.Namespace, device: str) -> EngineConfig:
    return EngineConfig(
        model=a.model,
        device=device,
        dtype=a.dtype,
        enforce_eager=a.enforce_eager,
        max_model_len=a.max_model_len,
        cache=CacheConfig(block_size=a.block_size, num_blocks=a.num_blocks, kv_cache_bytes=a.kv_cache_mb * 2**20),
        scheduler=SchedulerConfig(a.max_num_seqs, a.max_num_batched_tokens, not a.no_chunked_prefill),
    )


def _transfer_config(a: argparse.Namespace) -> TransferConfig:
    from services.transfer.config import TransferConfig

    return TransferConfig(timeout_s=a.transfer_timeout_s, failure_policy=a.transfer_failure_policy,
                          staging_mib=a.transfer_staging_mib, spin_us=a.transfer_spin_us,
                          host=a.host if a.host not in ("0.0.0.0", "::") else "127.0.0.1")


def _router_config(a: argparse.Namespace) -> RouterConfig:
    from services.router.config import RouterConfig

    return RouterConfig(
        mode=a.mode, prefill_policy=a.prefill_policy, decode_policy=a.decode_policy,
        local_prefill_threshold=a.local_prefill_threshold, lease_s=a.lease_s,
        failure_policy=a.transfer_failure_policy, default_max_tokens=a.default_max_tokens,
        slo_ttft_ms=a.slo_ttft_ms, slo_tpot_ms=a.slo_tpot_ms,
    )


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
