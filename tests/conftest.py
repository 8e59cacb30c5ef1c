import logging

import pytest


@pytest.fixture(autouse=True)
def _quiet_shardspeed_logs():
    logging.getLogger("shardspeed").setLevel(logging.WARNING)
    yield
