"""User-facing errors: the CLI prints these as one line, without a traceback."""


class MultiSSLError(Exception):
    """An error caused by the user's input (config, data, paths), not by a bug."""


class ConfigError(MultiSSLError):
    """An unknown, mistyped or inconsistent configuration value."""


class DataError(MultiSSLError):
    """A missing, unreadable, empty or malformed data source."""


class TrainingError(MultiSSLError):
    """Training cannot go on (e.g. the loss kept being non-finite)."""


class TrainingInterrupted(MultiSSLError):
    """SIGINT/SIGTERM arrived; a checkpoint was saved and the run can be resumed."""


class HubError(MultiSSLError):
    """A push to the Hugging Face Hub failed (no token, no rights, unreachable, conflict)."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (library errors can run to pages), or its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class OutputError(MultiSSLError):
    """An output folder cannot be used (not a folder, read-only, held by another run) or written
    (no space left on device)."""


def root_cause(err: BaseException) -> BaseException:
    """The innermost ``__cause__``/``__context__`` of ``err``: libraries (``datasets``) often wrap
    the useful message ("JSON parse error at line 3") in a generic one ("An error occurred while
    generating the dataset")."""
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if nxt is None:
            break
        err = nxt
    return err
