"""Domain errors. Each maps to one gRPC status code and to a one-line CLI error."""


class CAIError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""


class InvalidArgument(CAIError):
    """Bad input: a malformed file, field or parameter."""


class NotFound(CAIError):
    """A named thing (principle, model folder, file) does not exist."""


class ResourceExhausted(CAIError):
    """A bounded queue is full; the caller should retry later."""


class Unavailable(CAIError):
    """The backend is not ready or is shutting down."""


class Unauthenticated(CAIError):
    """No valid credentials were given."""


class PermissionDenied(CAIError):
    """The credentials are valid but do not allow this operation."""
