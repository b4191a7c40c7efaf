"""Fixtures of the fault tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.faults.test_broker_faults import Replicas
from tests.support.redis_server import RedisServer


@pytest.fixture
def replicas(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis
) -> Iterator[Replicas]:
    """`python -m broker` replicas on the session Redis (flushed by `redis_client`); whatever
    still runs at teardown is killed."""
    started = Replicas(tmp_path, redis_server.url)
    yield started
    started.close()
