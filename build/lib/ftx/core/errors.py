"""User-facing errors: one line, naming the file/line/field, exit code 2, no traceback."""


class FtxError(Exception):
    """An error caused by the user's input or environment. The CLI prints `error: <msg>` and exits 2."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
