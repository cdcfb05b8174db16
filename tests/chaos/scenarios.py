"""The chaos scenarios (issue 17). Each strikes a deployment under load and returns a ScenarioResult whose
violations() are the broken invariants (tests/chaos/invariants.py) and the scenario's own checks.

Each runs in its own event loop: `asyncio.run(prefill_kill(deployment, reference, scale))`.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from services.proto_gen import generation_pb2 as pb
from tests.chaos.client import Client, Outcome, Progress
from tests.chaos.deployment import Deployment
from tests.chaos.invariants import ScenarioResult, recover, settle, worker_names
from tests.chaos.workload import Reference, Req, Via, prompts


@dataclass(frozen=True)
class Scale:
    """Request counts and fault lengths: small for `make test`, larger for `make chaos`."""

    in_flight: int = 4  # long prompts in flight when a prefill worker is killed or stalled
    streams: int = 4  # streams under way when a decode worker is killed
    stall_s: float = 4.0  # how long a worker stays SIGSTOPped
    disconnects: int = 16
    cancels: int = 4
    overload: int = 200
    overload_deadline_s: float = 30.0
    deadline_s: float = 60.0


SOAK = Scale(in_flight=8, streams=16, stall_s=20.0, disconnects=16, cancels=8)


def _via(i: int) -> Via:
    return "grpc" if i % 2 == 0 else "http"


def _reqs(family: str, n: int, max_tokens: int, deadline_s: float) -> list[Req]:
    ps = prompts(family)
    return [Req(ps[i % len(ps)], max_tokens, _via(i), deadline_s) for i in range(n)]


async def _busy(client: Client, role: str, tasks: list[asyncio.Task[Outcome]], timeout_s: float = 3.0) -> pb.WorkerLoad:
    """The worker of `role` with the most work once one shows some; past `timeout_s` (GetLoad shows the
    router's last poll, about a second old, and a short prompt may come and go between two), the first one."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = await client.load(check_integrity=False)
        workers = [w for w in report.workers if w.role == role and w.alive]
        busy = [w for w in workers if w.num_running or w.queued_prefill_tokens or w.num_waiting]
        if busy:
            return max(busy, key=lambda w: (w.queued_prefill_tokens, w.num_running))
        if time.monotonic() > deadline or all(t.done() for t in tasks):
            return workers[0]
        await asyncio.sleep(0.05)


def _in_flight(result: ScenarioResult, tasks: list[asyncio.Task[Outcome]]) -> None:
    """Records how many requests were still running when the fault struck; a fault after them tests nothing."""
    running = len([t for t in tasks if not t.done()])
    result.checks[f"requests in flight when the fault struck ({running} of {len(tasks)})"] = running > 0


async def _under_way(progress: Progress, tasks: list[asyncio.Task[Outcome]], tokens: int,
                     timeout_s: float = 60.0) -> None:
    """Until every request still running has `tokens` out (or none runs any more)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = len([t for t in tasks if not t.done()])
        if progress.at_least(running, tokens) or not running:
            return
        await asyncio.sleep(0.02)


async def _finish(client: Client, result: ScenarioResult, tasks: list[asyncio.Task[Outcome]],
                  fault_end: float | None, workers: set[str], replaced: dict[str, int] | None = None) -> ScenarioResult:
    """Collects the outcomes, then the recovery time and what the workers still hold."""
    result.outcomes += await asyncio.gather(*tasks)
    if fault_end is not None:
        result.recovery_s = await recover(client, fault_end, workers, replaced)
    else:
        result.recovery_expected = False
    settled = await settle(client)
    result.leaked_blocks, result.problems = settled.leaked_blocks, settled.problems
    return result


async def prefill_kill(dep: Deployment, ref: Reference, scale: Scale) -> ScenarioResult:
    """SIGKILL the busiest prefill worker while long prompts are in flight: every one completes exactly, those
    of the killed worker prefilled again on the other prefill worker (counted); Ray restarts the worker."""
    result = ScenarioResult("prefill worker SIGKILL", dep.topology, errors_allowed=False)
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        workers = worker_names(await client.load(False))
        reprefills = await client.metric("pdserve_request_reprefills_total")
        tasks = [asyncio.create_task(client.send(r)) for r in _reqs("kill", scale.in_flight, 16, scale.deadline_s)]
        victim = await _busy(client, "prefill", tasks)
        _in_flight(result, tasks)
        killed_at = time.monotonic()
        dep.signal(victim, signal.SIGKILL)
        await _finish(client, result, tasks, killed_at, workers, {victim.worker: victim.pid})
        moved = await client.metric("pdserve_request_reprefills_total") - reprefills
        result.checks[f"prompts of the killed worker prefilled again on another (pdserve_request_reprefills_total "
                      f"+{moved:g})"] = moved >= 1
    return result


async def decode_kill(dep: Deployment, ref: Reference, scale: Scale) -> ScenarioResult:
    """SIGKILL a decode worker mid-stream: its streams continue on another decode worker by token replay (one
    continuous, exact stream each), and the migrations are counted."""
    result = ScenarioResult("decode worker SIGKILL mid-stream", dep.topology, errors_allowed=False)
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        workers = worker_names(await client.load(False))
        migrations = await client.metric("pdserve_request_migrations_total")
        progress = Progress()
        reqs = _reqs("medium", scale.streams, 96, scale.deadline_s)
        tasks = [asyncio.create_task(client.send(r, progress=progress)) for r in reqs]
        await _under_way(progress, tasks, 4)
        victim = await _busy(client, "decode", tasks)
        _in_flight(result, tasks)
        killed_at = time.monotonic()
        dep.signal(victim, signal.SIGKILL)
        await _finish(client, result, tasks, killed_at, workers, {victim.worker: victim.pid})
        moved = await client.metric("pdserve_request_migrations_total") - migrations
        result.checks[f"streams of the killed worker migrated (pdserve_request_migrations_total +{moved:g})"] = \
            moved >= 1
    return result


async def stall(dep: Deployment, ref: Reference, scale: Scale, role: str = "prefill") -> ScenarioResult:
    """SIGSTOP the busiest worker of `role` for scale.stall_s with long prompts in flight and more arriving,
    then SIGCONT: every request completes or fails clearly within its deadline."""
    result = ScenarioResult(f"{role} worker SIGSTOP {scale.stall_s:g} s", dep.topology)
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        workers = worker_names(await client.load(False))
        family, out = ("stall", 16) if role == "prefill" else ("medium", 64)
        reqs = _reqs(family, scale.in_flight * 2, out, scale.deadline_s)
        first, later = reqs[: scale.in_flight], reqs[scale.in_flight:]
        tasks = [asyncio.create_task(client.send(r)) for r in first]
        victim = await _busy(client, role, tasks)
        _in_flight(result, tasks)
        dep.signal(victim, signal.SIGSTOP)
        try:
            for r in later:  # arrivals during the stall
                tasks.append(asyncio.create_task(client.send(r)))
                await asyncio.sleep(scale.stall_s / max(1, len(later)))
        finally:
            dep.signal(victim, signal.SIGCONT)
        return await _finish(client, result, tasks, time.monotonic(), workers)


async def client_disconnect(dep: Deployment, ref: Reference, scale: Scale) -> ScenarioResult:
    """Clients go away mid-stream (gRPC cancel, HTTP connection closed): their KV is freed at once."""
    result = ScenarioResult(f"client disconnects mid-stream ×{scale.disconnects}", dep.topology)
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        reqs = _reqs("medium", scale.disconnects, 96, scale.deadline_s)
        result.outcomes += await asyncio.gather(*(client.send(r, cancel_after=3) for r in reqs))
        settled = await settle(client, timeout_s=5.0)  # freed at once: no lease needs to run out
        result.leaked_blocks, result.problems = settled.leaked_blocks, settled.problems
        result.outcomes += await asyncio.gather(*(client.send(r) for r in _reqs("short", 4, 16, scale.deadline_s)))
        result.recovery_expected = False
        result.checks["every disconnect happened mid-stream"] = all(
            o.kind == "cancelled" for o in result.outcomes[: len(reqs)])
    return result


async def cancel_before_first_token(dep: Deployment, ref: Reference, scale: Scale) -> ScenarioResult:
    """Long prompts cancelled before their first token: the prefill workers drop the work and hold nothing; how
    soon they are idle again is measured (GetLoad shows the router's last poll, about a second old)."""
    result = ScenarioResult(f"cancel before first token ×{scale.cancels}", dep.topology)
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        ps = prompts("stall")  # not cached by this scenario's own earlier requests: a fresh tail each time
        reqs = [Req(tuple(reversed(ps[i % len(ps)])), 16, "grpc", scale.deadline_s) for i in range(scale.cancels)]
        tasks = [asyncio.create_task(client.send(r, cancel_after=0)) for r in reqs]
        result.outcomes += await asyncio.gather(*tasks)
        cancelled_at = time.monotonic()
        idle_after = None
        while time.monotonic() - cancelled_at < 10:
            report = await client.load(check_integrity=False)
            if not any(w.num_running or w.queued_prefill_tokens or w.num_waiting
                       for w in report.workers if w.role == "prefill"):
                idle_after = time.monotonic() - cancelled_at
                break
            await asyncio.sleep(0.05)
        result.checks["the prefill workers dropped the cancelled work (idle again within 10 s)"] = \
            idle_after is not None
        result.measured["prefill idle after the cancels s"] = idle_after  # reported: a timing, not asserted
        settled = await settle(client)
        result.leaked_blocks, result.problems = settled.leaked_blocks, settled.problems
        result.recovery_expected = False
    return result


async def abort_from_another_connection(dep: Deployment, ref: Reference, scale: Scale) -> ScenarioResult:
    """Abort by id from a second connection is refused (found=False) and the stream completes exactly; the
    owner's own abort ends its request with finish_reason "abort"."""
    result = ScenarioResult("abort from another connection", dep.topology)
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        victim = Req(prompts("medium")[0], 96, "grpc", scale.deadline_s, request_id="chaos-abort-victim")
        progress = Progress()
        task = asyncio.create_task(client.send(victim, progress=progress))
        await _under_way(progress, [task], 2)
        # A connection of its own: channels of one process otherwise share gRPC's global subchannel pool, and
        # so one TCP connection, which is one caller to the router.
        async with grpc.aio.insecure_channel(dep.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)]) as other:
            from services.proto_gen import generation_pb2_grpc as pb_grpc

            reply = await pb_grpc.GenerationStub(other).Abort(pb.AbortRequest(request_id=victim.request_id), timeout=10)
        result.checks["a stranger's abort is refused (found=False)"] = not reply.found
        result.outcomes.append(await task)
        own = Req(prompts("medium")[1], 96, "grpc", scale.deadline_s, request_id="chaos-abort-own")
        call = client.stub.Generate(pb.GenerateRequest(
            request_id=own.request_id, token_ids=pb.TokenIds(ids=own.prompt),
            sampling=pb.SamplingParams(temperature=0, max_tokens=own.max_tokens, ignore_eos=True)), timeout=30)
        replies = [await call.read()]
        found = (await client.stub.Abort(pb.AbortRequest(request_id=own.request_id), timeout=10)).found
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                replies.append(reply)
        except grpc.aio.AioRpcError as e:
            result.problems.append(f"the owner's aborted stream ended in {e.code().name}: {e.details()}")
        result.checks["the owner's abort ends its request with finish_reason abort"] = \
            found and replies[-1].complete.finish_reason == "abort"
        settled = await settle(client)
        result.leaked_blocks, result.problems = settled.leaked_blocks, settled.problems
        result.recovery_expected = False
    return result


async def stale_peer(dep: Deployment, ref: Reference, scale: Scale) -> ScenarioResult:
    """Restart each decode worker (SIGKILL; Ray starts it again with a new KV address): later hand-offs go to
    the new endpoint, never the dead one, so none fails and all are exact."""
    result = ScenarioResult("worker restart, stale peer", dep.topology)
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        before = await client.load(False)
        workers = worker_names(before)
        warm = _reqs("kv", 4, 16, scale.deadline_s)
        result.outcomes += await asyncio.gather(*(client.send(r) for r in warm))  # every sender knows every peer
        killed_at = time.monotonic()
        decodes = [w for w in before.workers if w.role == "decode"]
        for w in decodes:
            dep.signal(w, signal.SIGKILL)
        result.recovery_s = await recover(client, killed_at, workers, {w.worker: w.pid for w in decodes})
        reasons = ("timeout", "peer_gone", "bad_header", "incompatible")
        failures = [await client.metric("pdserve_kv_transfer_failures_total", reason=r) for r in reasons]
        after = [Req(p, 16, _via(i), scale.deadline_s) for i, p in enumerate(prompts("kv")[4:12])]
        result.outcomes += await asyncio.gather(*(client.send(r) for r in after))
        more = {r: await client.metric("pdserve_kv_transfer_failures_total", reason=r) - f
                for r, f in zip(reasons, failures, strict=True)}
        failed = {r: n for r, n in more.items() if n}
        result.checks[f"no KV hand-off failed after the restart (failed: {failed or 0})"] = not failed
        settled = await settle(client)
        result.leaked_blocks, result.problems = settled.leaked_blocks, settled.problems
    return result


async def overload(dep: Deployment, ref: Reference, scale: Scale) -> ScenarioResult:
    """scale.overload concurrent long requests: past its capacity the router refuses at once (HTTP 429 with
    Retry-After, gRPC RESOURCE_EXHAUSTED); the requests it admits complete exactly; none times out."""
    result = ScenarioResult(f"overload ×{scale.overload}", dep.topology)
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        reqs = _reqs("overload", scale.overload, 64, scale.overload_deadline_s)
        started = time.monotonic()
        result.outcomes += await asyncio.gather(*(client.send(r) for r in reqs))
        refused = [o for o in result.outcomes if o.code in ("RESOURCE_EXHAUSTED", "429")]
        result.checks[f"some requests are refused for capacity ({len(refused)})"] = bool(refused)
        result.checks["every 429 carries Retry-After"] = all(o.retry_after for o in refused if o.code == "429")
        # How soon the refusals came, beside the first completion: reported, not asserted (on a loaded host
        # the router's own event loop takes seconds to answer 200 arrivals).
        result.measured["slowest refusal s"] = max((o.seconds for o in refused), default=None)
        result.measured["first completion s"] = min((o.seconds for o in result.outcomes if o.kind == "exact"),
                                                    default=None)
        others = [o for o in result.outcomes if o.kind == "error" and o not in refused]
        result.checks[f"no error but capacity refusals ({len(others)})"] = not others
        result.recovery_s = await recover(client, started + max(o.seconds for o in result.outcomes),
                                          worker_names(await client.load(False)))
        settled = await settle(client)
        result.leaked_blocks, result.problems = settled.leaked_blocks, settled.problems
    return result


async def router_sigterm(dep: Deployment, ref: Reference, scale: Scale,
                         terminate: Callable[[], None]) -> ScenarioResult:
    """SIGTERM the router (`terminate`) with streams in flight: health turns NOT_SERVING first, new requests are
    refused with UNAVAILABLE or 503 while it drains, and every stream in flight finishes exactly."""
    result = ScenarioResult("router SIGTERM under load", dep.topology)
    result.recovery_expected = False
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        progress = Progress()
        in_flight = _reqs("medium", 8, 96, scale.deadline_s)
        tasks = [asyncio.create_task(client.send(r, progress=progress)) for r in in_flight]
        await _under_way(progress, tasks, 2)
        health: list[tuple[float, int]] = []

        async def watch() -> None:
            while True:
                health.append((time.monotonic(), await client.health()))
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        terminate()
        refused: list[tuple[Outcome, int]] = []  # each new request's outcome, and the health asked right after
        short = prompts("short")
        while not all(t.done() for t in tasks):
            i = len(refused)
            outcome = await client.send(Req(short[i % len(short)], 4, _via(i), 10))
            refused.append((outcome, await client.health()))
            await asyncio.sleep(0.1)
        watcher.cancel()
        streams = list(await asyncio.gather(*tasks))
    result.outcomes = streams + [o for o, _ in refused]
    result.checks["every stream in flight finished exactly"] = all(o.kind == "exact" for o in streams)
    late = [o for o, _ in refused if o.kind != "error" or o.code not in ("UNAVAILABLE", "503", "refused")]
    result.checks[f"new requests refused with UNAVAILABLE/503 ({len(refused) - len(late)} of {len(refused)})"] = \
        bool(refused) and not late
    # Health turns first: no request is refused while health still says SERVING, and NOT_SERVING (2) was seen.
    serving_after_refusal = [o for o, status in refused if o.kind == "error" and status == 1]
    seen = sorted({status for _, status in health} | {status for _, status in refused})
    result.checks[f"health NOT_SERVING first (statuses seen {seen}; refusals while SERVING "
                  f"{len(serving_after_refusal)})"] = 2 in seen and not serving_after_refusal
    return result


async def prefill_pool_stall(dep: Deployment, ref: Reference, scale: Scale, stall_s: float = 24.0) -> ScenarioResult:
    """SIGSTOP every prefill worker for `stall_s` under a steady arrival of requests, then SIGCONT. The router
    marks them down once its poll gives up on them; meanwhile the requests sent to them wait, later ones are
    prefilled on the decode workers (each a failed hand-off, counted). All complete exactly or fail clearly;
    in Prometheus this is what fires PdserveWorkerDown, PdserveKVTransferFailures and the TTFT burn alerts."""
    result = ScenarioResult(f"whole prefill pool SIGSTOP {stall_s:g} s", dep.topology)
    async with Client(dep.grpc_target, dep.http_base, ref) as client:
        before = await client.load(False)
        workers = worker_names(before)
        prefills = [w for w in before.workers if w.role == "prefill"]
        ps = prompts("short")
        tasks: list[asyncio.Task[Outcome]] = []
        for w in prefills:
            dep.signal(w, signal.SIGSTOP)
        try:
            stop_at = time.monotonic() + stall_s
            while time.monotonic() < stop_at:
                i = len(tasks)
                tasks.append(asyncio.create_task(client.send(Req(ps[i % len(ps)], 16, _via(i), scale.deadline_s))))
                await asyncio.sleep(0.5)
        finally:
            for w in prefills:
                dep.signal(w, signal.SIGCONT)
        return await _finish(client, result, tasks, time.monotonic(), workers)
