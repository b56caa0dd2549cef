"""Counting everything that preprocessing leaves out or changes, so that nothing is dropped silently."""

from __future__ import annotations

from collections import Counter


class SkipReport:
    """Tallies by reason, in three kinds, printed at the end of every preprocessing run.

    * ``records``: output lines that were not written (a whole image, ref sentence or caption);
    * ``objects``: objects removed from a record that was still written (the record lost that object);
    * ``notes``: repairs and other non-destructive events worth knowing about (e.g. a caption tag fixed).
    """

    def __init__(self) -> None:
        self.written = 0
        self.records: Counter[str] = Counter()
        self.objects: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()

    def skip_record(self, reason: str, n: int = 1) -> None:
        self.records[reason] += n

    def drop_object(self, reason: str, n: int = 1) -> None:
        self.objects[reason] += n

    def note(self, reason: str, n: int = 1) -> None:
        self.notes[reason] += n

    def merge(self, other: SkipReport) -> None:
        self.written += other.written
        self.records.update(other.records)
        self.objects.update(other.objects)
        self.notes.update(other.notes)

    def to_dict(self) -> dict:
        return {
            "written": self.written,
            "skipped_records": dict(sorted(self.records.items())),
            "dropped_objects": dict(sorted(self.objects.items())),
            "notes": dict(sorted(self.notes.items())),
        }

    def format(self, title: str) -> str:
        """Human-readable summary, one reason per line with its count."""
        lines = [f"{title}: wrote {self.written} records"]
        for name, counter in (("skipped records", self.records), ("dropped objects", self.objects),
                              ("notes", self.notes)):
            total = sum(counter.values())
            lines.append(f"  {name}: {total}")
            for reason, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"    {count:>9}  {reason}")
        return "\n".join(lines)
