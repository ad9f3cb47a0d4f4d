"""Domain errors raised by services; the API turns them into 400/409 with the message."""


class DomainError(Exception):
    """A request that cannot be carried out as asked. `code` is stable, `message` is for people."""

    status = 400
    code = "invalid"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class InvalidInput(DomainError):
    status = 400
    code = "invalid"


class Conflict(DomainError):
    """The object is not in a state that allows this change (e.g. approving an active device)."""

    status = 409
    code = "conflict"
