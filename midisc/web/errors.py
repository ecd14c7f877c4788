"""The one error the browser's own reads raise: what was asked for does not exist (answered with a 404 page)."""


class NotFound(LookupError):
    """A feature past the run's width, a run with no features, a sweep with no runs; says what exists."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
