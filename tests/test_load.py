"""The load test at a small size: concurrent annotators, zero errors, every mask the right one."""

from tools.load_test import run


def test_concurrent_annotators_get_only_right_masks():
    result = run(annotators=3, tasks=1, clicks=4, image_size=(800, 600), threads=4, time_limit=120)
    assert result.clicks == 12
    assert result.errors == 0 and result.wrong_masks == 0
    assert result.peak_rss_mb > 0
