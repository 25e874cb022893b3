"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


def describe(err: BaseException, limit: int = 240) -> str:
    """One line for a library's exception inside a UserError: its first line (and the next one when the first only
    announces it, "Validation error for field 'x':"), at most `limit` characters; the type name when it has no text."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0] + (f" {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def at_least(option: str, value, low=1):
    """A numeric option's lower bound (also refuses NaN), checked before any work; returns the value."""
    if value is None or not value >= low:
        raise UserError(f"{option} must be >= {low}, got {value}")
    return value
