"""The 5-field cron schedules of DataImportCron: when each fires next, and what is refused."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from controlplane.cron_schedule import CronSchedule

NOW = datetime(2026, 12, 1, 23, 40, tzinfo=timezone.utc)  # a Tuesday


@pytest.mark.parametrize("text,expected", [
    ("30 1 * * 1", datetime(2026, 12, 7, 1, 30)),          # CDI's example: Mondays 01:30
    ("*/15 * * * *", datetime(2026, 12, 1, 23, 45)),
    ("40 23 * * *", datetime(2026, 12, 2, 23, 40)),        # strictly after: not now again
    ("0 0 29 2 *", datetime(2028, 2, 29, 0, 0)),           # the next leap day
    ("0 12 1 * mon", datetime(2026, 12, 7, 12, 0)),        # day of month OR weekday, both given
    ("0 0 * * 7", datetime(2026, 12, 6, 0, 0)),            # 7 is Sunday as 0 is
    ("0 6-8/2 * jan-feb *", datetime(2027, 1, 1, 6, 0)),
    ("5,10 0 1 1 *", datetime(2027, 1, 1, 0, 5)),
    ("@daily", datetime(2026, 12, 2, 0, 0)),
    ("@weekly", datetime(2026, 12, 6, 0, 0)),
])
def test_next_tick(text, expected):
    assert CronSchedule(text).next_after(NOW) == expected.replace(tzinfo=timezone.utc)


@pytest.mark.parametrize("text,message", [
    ("", "a cron schedule is required"),
    ("1 2 3", "has 3 fields"),
    ("61 * * * *", "minute 61 is outside 0-59"),
    ("* 24 * * *", "hour 24 is outside 0-23"),
    ("* * * 13 *", "month 13 is outside 1-12"),
    ("* * * * 8", "day of week 8 is outside 0-7"),
    ("x * * * *", "minute 'x' is not a number"),
    ("² * * * *", "minute '²' is not a number"),  # a digit to str.isdigit(), no number to int()
    ("5-1 * * * *", "runs backwards"),
    ("*/0 * * * *", "step 0 is outside"),
    ("0 0 31 2 *", "never fires"),
])
def test_what_is_not_a_schedule_is_refused_naming_the_field(text, message):
    with pytest.raises(ValueError, match=message):
        CronSchedule(text).next_after(NOW)
