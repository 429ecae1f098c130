"""Standard 5-field cron schedules (minute hour day-of-month month day-of-week, as Kubernetes
CronJobs and CDI's DataImportCron take them), with lists, ranges, steps, month and weekday
names and the @hourly/@daily/@weekly/@monthly/@yearly shorthands. Times are UTC. Pure: the
caller says what time it is, so a schedule is tested without waiting for it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

_MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()
_DAYS = "sun mon tue wed thu fri sat".split()
# (name, lowest, highest, names of the values from `lowest` on)
_FIELDS = (("minute", 0, 59, []), ("hour", 0, 23, []), ("day of month", 1, 31, []),
           ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _DAYS))
_SHORTHANDS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
               "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_LOOKAHEAD_DAYS = 5 * 366  # Feb 29 on a given weekday comes round within this


def _value(text: str, name: str, low: int, high: int, names: list[str]) -> int:
    if text.lower() in names:
        return names.index(text.lower()) + low
    if not (text.isascii() and text.isdigit()):  # int() takes no '²'
        raise ValueError(f"{name} {text[:16]!r} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside {low}-{high}")
    return value


def _parse_field(text: str, name: str, low: int, high: int, names: list[str]) -> tuple[set[int], bool]:
    """(the values it allows, whether it was restricted, i.e. not a bare '*')."""
    values: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        step = _value(step_text, f"{name} step", 1, high - low + 1, []) if step_text else 1
        if span == "*":
            first, last = low, high
        elif "-" in span:
            a, _, b = span.partition("-")
            first, last = _value(a, name, low, high, names), _value(b, name, low, high, names)
            if first > last:
                raise ValueError(f"{name} range {span!r} runs backwards")
        else:
            first = _value(span, name, low, high, names)
            last = high if step_text else first
        values.update(range(first, last + 1, step))
    return values, text != "*"


class CronSchedule:
    """One schedule; ValueError (naming the field) if the text is not one."""

    def __init__(self, text: object):
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a cron schedule is required (e.g. \"30 1 * * 1\")")
        fields = _SHORTHANDS.get(text.strip().lower(), text).split()
        if len(fields) != 5:
            raise ValueError(f"{text[:64]!r} has {len(fields)} fields; a cron schedule has 5 "
                             "(minute hour day-of-month month day-of-week)")
        parsed = [_parse_field(f, *spec) for f, spec in zip(fields, _FIELDS)]
        (self.minutes, _), (self.hours, _), (self.days, self._days_set), (self.months, _), (weekdays, self._wd_set) = parsed
        self.weekdays = {d % 7 for d in weekdays}  # 7 is Sunday too
        self.text = text

    def _day_matches(self, day: datetime) -> bool:
        if day.month not in self.months:
            return False
        dom, dow = day.day in self.days, (day.weekday() + 1) % 7 in self.weekdays
        if self._days_set and self._wd_set:  # both given: either will do (cron's rule)
            return dom or dow
        return dom and dow

    def next_after(self, when: datetime) -> datetime:
        """The first time the schedule fires strictly after `when` (an aware UTC datetime)."""
        start = when.replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = start.replace(hour=0, minute=0)
        for _ in range(_LOOKAHEAD_DAYS):
            if self._day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        at = day.replace(hour=hour, minute=minute)
                        if at >= start:
                            return at
            day += timedelta(days=1)
        raise ValueError(f"{self.text!r} never fires")
