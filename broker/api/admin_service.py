"""AdminService: the queue list, dead letters (list, redrive, delete), pause and resume, queue
settings (limits), per-key stats of group keys, and the audit trail; every change is recorded
in the audit trail."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from broker.api import convert
from broker.audit import AuditTrail
from broker.auth.authorize import Authorizer
from broker.page_tokens import (
    decode_group_key_token,
    decode_page_token,
    decode_queue_token,
    encode_group_key_token,
    encode_page_token,
    encode_queue_token,
)
from taskbroker.v1 import admin_service_pb2 as admin

if TYPE_CHECKING:
    from broker.models import AuditRecord
    from broker.queue import TaskQueue

Context = grpc.aio.ServicerContext[bytes, bytes]


class AdminService:
    """Management RPCs. Every action that changes something is recorded in the audit trail."""

    def __init__(self, tasks: TaskQueue, authorizer: Authorizer, audit: AuditTrail) -> None:
        self._tasks = tasks
        self._authorizer = authorizer
        self._audit = audit

    async def ListQueues(
        self, request: admin.ListQueuesRequest, context: Context
    ) -> admin.ListQueuesResponse:
        # Only the queues the caller holds some role on (access.py checks nothing here).
        names, last = await self._tasks.queue_page(
            request.page_size, decode_queue_token(request.page_token), self._authorizer.permitted
        )
        return admin.ListQueuesResponse(queues=names, next_page_token=encode_queue_token(last))

    async def ListDeadTasks(
        self, request: admin.ListDeadTasksRequest, context: Context
    ) -> admin.ListDeadTasksResponse:
        page = await self._tasks.list_dead(
            request.queue, request.page_size, decode_page_token(request.page_token)
        )
        return admin.ListDeadTasksResponse(
            tasks=[convert.task_to_proto(t) for t in page.tasks],
            next_page_token=encode_page_token(page.next_cursor) if page.next_cursor else "",
        )

    async def RedriveDeadTasks(
        self, request: admin.RedriveDeadTasksRequest, context: Context
    ) -> admin.RedriveDeadTasksResponse:
        ids = list(request.task_ids)
        count = await self._audit.dead_letter_action(
            "RedriveDeadTasks",
            request.queue,
            lambda: self._tasks.redrive_dead(request.queue, ids, request.all),
            (ids, request.all),
            "redriven",
        )
        return admin.RedriveDeadTasksResponse(redriven_count=count)

    async def DeleteDeadTasks(
        self, request: admin.DeleteDeadTasksRequest, context: Context
    ) -> admin.DeleteDeadTasksResponse:
        ids = list(request.task_ids)
        count = await self._audit.dead_letter_action(
            "DeleteDeadTasks",
            request.queue,
            lambda: self._tasks.delete_dead(request.queue, ids, request.all),
            (ids, request.all),
            "deleted",
        )
        return admin.DeleteDeadTasksResponse(deleted_count=count)

    async def PauseQueue(
        self, request: admin.PauseQueueRequest, context: Context
    ) -> admin.PauseQueueResponse:
        await self._audit.admin_action(
            "PauseQueue", request.queue, lambda: self._tasks.set_paused(request.queue, True)
        )
        return admin.PauseQueueResponse()

    async def ResumeQueue(
        self, request: admin.ResumeQueueRequest, context: Context
    ) -> admin.ResumeQueueResponse:
        await self._audit.admin_action(
            "ResumeQueue", request.queue, lambda: self._tasks.set_paused(request.queue, False)
        )
        return admin.ResumeQueueResponse()

    async def GetQueueSettings(
        self, request: admin.GetQueueSettingsRequest, context: Context
    ) -> admin.GetQueueSettingsResponse:
        settings = await self._tasks.queue_settings(request.queue)
        return admin.GetQueueSettingsResponse(settings=convert.settings_to_proto(settings))

    async def UpdateQueueSettings(
        self, request: admin.UpdateQueueSettingsRequest, context: Context
    ) -> admin.UpdateQueueSettingsResponse:
        wanted = convert.settings_from_proto(request.settings)
        mask = list(request.update_mask.paths)
        settings = await self._audit.admin_action(
            "UpdateQueueSettings",
            request.queue,
            lambda: self._tasks.update_queue_settings(request.queue, wanted, mask),
            detail=f"changed {', '.join(mask) or 'all settings'}",
        )
        return admin.UpdateQueueSettingsResponse(settings=convert.settings_to_proto(settings))

    async def ListGroupKeys(
        self, request: admin.ListGroupKeysRequest, context: Context
    ) -> admin.ListGroupKeysResponse:
        page = await self._tasks.group_keys(
            request.queue, request.page_size, decode_group_key_token(request.page_token)
        )
        return convert.group_key_page_to_proto(page, encode_group_key_token(page.next_cursor))

    async def ListAuditRecords(
        self, request: admin.ListAuditRecordsRequest, context: Context
    ) -> admin.ListAuditRecordsResponse:
        records, token = await self._audit.page(request.page_size, request.page_token)
        return admin.ListAuditRecordsResponse(
            records=[_audit_to_proto(r) for r in records], next_page_token=token
        )


def _audit_to_proto(record: AuditRecord) -> admin.AuditRecord:
    proto = admin.AuditRecord(
        principal=record.principal,
        action=record.action,
        target=record.target,
        outcome=record.outcome,
        detail=record.detail,
    )
    proto.time.FromMilliseconds(record.time_ms)
    return proto
