"""Progress bars for rounds and clients (rich), or nothing with ``--quiet``."""
from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start_rounds(self, name: str, total: int, completed: int = 0) -> None: ...
    def start_clients(self, total: int) -> None: ...
    def client_done(self) -> None: ...
    def round_done(self) -> None: ...
    def log(self, msg: str) -> None: ...


class RichProgress(NullProgress):
    def __init__(self):
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("eta"), TimeRemainingColumn(), transient=False)
        self.rounds = self.clients = None

    def __enter__(self):
        self.p.__enter__()
        return self

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)

    def start_rounds(self, name, total, completed=0):
        if self.rounds is not None:
            self.p.remove_task(self.rounds)
        self.rounds = self.p.add_task(f"{name}: rounds", total=total, completed=completed)
        if self.clients is None:
            self.clients = self.p.add_task("  clients", total=1)

    def start_clients(self, total):
        self.p.reset(self.clients, total=total)

    def client_done(self):
        self.p.advance(self.clients)

    def round_done(self):
        self.p.advance(self.rounds)

    def log(self, msg):
        self.p.console.log(msg)


def make_progress(quiet: bool) -> NullProgress:
    return NullProgress() if quiet else RichProgress()
