"""BrokerService: proto → models → TaskQueue → proto. Thin by design."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import grpc

from broker.api import convert
from broker.api.lease_session import LeaseSession, SessionRegistry
from broker.api.limits import StreamLimits, client_of_principal
from broker.auth.authorize import Authorizer
from broker.auth.principal import Role, current_principal
from broker.errors import Draining, InvalidArgument
from broker.models import SettleStatus, TaskState
from broker.page_tokens import decode_queue_token, encode_queue_token
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2

if TYPE_CHECKING:
    from broker.dispatch import Dispatcher
    from broker.queue import TaskQueue
    from broker.watch import WatchHub

Context = grpc.aio.ServicerContext[bytes, bytes]
READ = (Role.READ,)


class BrokerService:
    """The producer and worker RPCs."""

    def __init__(
        self,
        tasks: TaskQueue,
        dispatcher: Dispatcher,
        registry: SessionRegistry,
        default_lease_ms: int,
        open_timeout_s: float,
        streams: StreamLimits,
        authorizer: Authorizer,
        watch: WatchHub,
    ) -> None:
        self._tasks = tasks
        self._dispatcher = dispatcher
        self._registry = registry
        self._default_lease_ms = default_lease_ms
        self._open_timeout_s = open_timeout_s
        self._streams = streams
        self._authorizer = authorizer
        self._watch = watch

    async def Enqueue(self, request: bs.EnqueueRequest, context: Context) -> bs.EnqueueResponse:
        if self._dispatcher.draining:
            raise Draining("the broker is shutting down; use another replica")
        # No local wake-up here: enqueue.lua publishes one that reaches every replica's pumps,
        # this one's included; waking them here too made a second, empty lease call per task.
        requests = await convert.task_requests(request.tasks)
        outcomes = await self._tasks.enqueue(requests, current_principal.get().scope)
        # Dicts, not EnqueueResult messages: upb builds the list from them in half the time.
        results: list[Any] = [{"task_id": o.task_id, "duplicate": o.duplicate} for o in outcomes]
        return bs.EnqueueResponse(results=results)

    async def Lease(self, context: Context) -> None:
        if self._dispatcher.draining:
            raise Draining("the broker is shutting down; use another replica")
        # Counted before anything is built for the stream; given back however it ends.
        client = client_of_principal(current_principal.get())
        with self._streams.admit(context.peer(), client):
            session = LeaseSession(
                context,
                self._tasks,
                self._dispatcher,
                self._registry,
                self._open_timeout_s,
                self._default_lease_ms,
                self._authorizer,
                self._streams.meter(context.peer(), client),
                self._streams.client_key(context.peer(), client),
            )
            await session.run()

    async def Ack(self, request: lease_pb2.AckRequest, context: Context) -> bs.AckResponse:
        holder = current_principal.get().scope
        result = await self._tasks.ack(request.task_id, request.lease_id, request.result, holder)
        self._registry.forget(request.lease_id)
        return bs.AckResponse(already_settled=result.status is SettleStatus.AGAIN)

    async def Nack(self, request: lease_pb2.NackRequest, context: Context) -> bs.NackResponse:
        result = await self._tasks.nack(
            request.task_id,
            request.lease_id,
            request.error,
            convert.optional_duration_ms(request, "retry_delay"),
            request.dead_letter,
            current_principal.get().scope,
        )
        self._registry.forget(request.lease_id)
        response = bs.NackResponse(
            already_settled=result.status is SettleStatus.AGAIN,
            state=int(result.state or TaskState.DEAD),  # type: ignore[arg-type]
        )
        if result.state is not TaskState.DEAD and result.time_ms is not None:
            response.retry_time.CopyFrom(convert.to_timestamp(result.time_ms))
        return response

    async def ExtendLease(
        self, request: lease_pb2.ExtendLeaseRequest, context: Context
    ) -> bs.ExtendLeaseResponse:
        result = await self._tasks.extend(
            request.task_id,
            request.lease_id,
            convert.optional_duration_ms(request, "lease_duration"),
            current_principal.get().scope,
        )
        return bs.ExtendLeaseResponse(lease_expire_time=convert.to_timestamp(result.expire_ms))

    async def GetTask(self, request: bs.GetTaskRequest, context: Context) -> bs.GetTaskResponse:
        task = await self._tasks.get(request.task_id)
        links = await self._tasks.links(task)
        return bs.GetTaskResponse(task=convert.task_to_proto(task, links))

    async def WatchTask(self, request: bs.WatchTaskRequest, context: Context) -> None:
        # The hub refuses new watches once the broker drains, and ends open ones (UNAVAILABLE:
        # clients watch again through another replica). Its deadline is server.py's.
        async with contextlib.aclosing(self._watch.watch(request.task_id)) as changes:
            async for task in changes:
                links = await self._tasks.links(task)  # as GetTask shows them
                response = bs.WatchTaskResponse(task=convert.task_to_proto(task, links))
                await context.write(response.SerializeToString())

    async def CancelTask(
        self, request: bs.CancelTaskRequest, context: Context
    ) -> bs.CancelTaskResponse:
        task, revoked = await self._tasks.cancel(request.task_id)
        if revoked:
            self._registry.revoke(request.task_id, revoked, "cancelled")
        links = await self._tasks.links(task)
        return bs.CancelTaskResponse(task=convert.task_to_proto(task, links))

    async def Stats(self, request: bs.StatsRequest, context: Context) -> bs.StatsResponse:
        last = ""
        if request.queues:
            stats = await self._tasks.stats(list(request.queues))
        else:
            if request.page_size < 0:
                raise InvalidArgument("page_size", "must not be negative")
            after = decode_queue_token(request.page_token)
            # Named queues were checked (access.py); a page shows only the readable ones.
            stats, last = await self._tasks.stats_page(
                request.page_size, after, lambda queue: self._authorizer.permitted(queue, READ)
            )
        return bs.StatsResponse(
            queues=[convert.stats_to_proto(s) for s in stats],
            next_page_token=encode_queue_token(last),
        )
