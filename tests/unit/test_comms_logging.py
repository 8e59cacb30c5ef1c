"""The comms logger's arithmetic, without processes: bandwidth formulas, sizes, trimmed means, the table.

Expected bandwidths are DeepSpeed's formulas (deepspeed/utils/comms_logging.py, calc_bw_log) worked by
hand for 1 MB in 1 ms on a group of 4 (1e6 bytes/ms x 8 / 1e6 = 8 Gbps), except the documented
correction for reduce-scatter (DeepSpeed: 32 and 24, n times too high).
"""
from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest

from shardspeed.comm.comms_logging import CommsLogger, bandwidths, convert_size, trim_mean


@pytest.mark.parametrize("op,alg,bus", [
    ("all_reduce", 16.0, 12.0),  # 2S/t; S/t x 2(n-1)/n
    ("all_gather_into_tensor", 32.0, 24.0), ("all_gather", 32.0, 24.0),  # the message is one rank's shard: n S
    ("reduce_scatter_tensor", 8.0, 6.0),  # the message is the whole input already
    ("all_to_all_single", 8.0, 6.0), ("isend", 8.0, 8.0), ("broadcast", 8.0, 8.0), ("barrier", 8.0, 8.0),
])
def test_bandwidths(op: str, alg: float, bus: float) -> None:
    """Catches a formula changed, or the group size not used for n."""
    assert bandwidths(op, 1_000_000, 1.0, 4) == pytest.approx((alg, bus))


def test_sizes_and_trimmed_mean() -> None:
    """Catches DeepSpeed's size strings or its 10 % outlier trimming drifting."""
    assert (convert_size(0), convert_size(1024), convert_size(4000), convert_size(3 * 2 ** 30)) == ("0B", "1.0 KB", "3.91 KB",
                                                                                                      "3.0 GB")
    assert trim_mean(list(range(1, 11)), 0.1) == 5.5 and trim_mean([], 0.1) == 0.0


def test_append_summarises_per_name_and_size() -> None:
    """Catches records of one op at two sizes merged, or the count and latencies out of step."""
    logger = CommsLogger()
    for latency in (1.0, 2.0, 3.0):
        logger.append("all_reduce", "all_reduce", latency, 4000, 2)
    logger.append("all_reduce", "all_reduce", 5.0, 8, 2)
    assert logger.get_total_operations() == 4 and logger.get_operation_names() == ["all_reduce"]
    summary = logger.get_operation_summary("all_reduce")
    assert summary is not None and summary[4000]["count"] == 3 and summary[4000]["total_latency_ms"] == 6.0
    assert summary[4000]["avg_latency_ms"] == 2.0 and summary[8]["msg_size_str"] == "8.0 B"
    out = io.StringIO()
    with redirect_stdout(out):
        logger.log_all()
    lines = out.getvalue().splitlines()
    assert lines[1] == "all_reduce"
    assert lines[2] == f"{'':<20}{'8.0 B':<20}{1:<20}{5.0:<20.2f}{5.0:<20.2f}" + "".join(
        f"{x:<20.2f}" for x in bandwidths("all_reduce", 8, 5.0, 2))
    logger.reset_data()
    assert not logger.has_data()
