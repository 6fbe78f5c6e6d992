"""Message type bytes of the PostgreSQL v3 protocol, named per direction.

The same letter means different things in the two directions ('D' is Describe
from a client and DataRow from a server), so every constant says which way it
goes: ``FE_`` for frontend (client to server), ``BE_`` for backend (server to
client). The values are the ints a ``bytes`` object yields when indexed, which is
how the relay reads a message's type.
"""

from __future__ import annotations

from typing import Final

# ---------------------------------------------------------------- frontend

FE_BIND: Final = 0x42  # 'B'
FE_CLOSE: Final = 0x43  # 'C'
FE_DESCRIBE: Final = 0x44  # 'D'
FE_EXECUTE: Final = 0x45  # 'E'
FE_FUNCTION_CALL: Final = 0x46  # 'F'
FE_FLUSH: Final = 0x48  # 'H'
FE_PARSE: Final = 0x50  # 'P'
FE_QUERY: Final = 0x51  # 'Q'
FE_SYNC: Final = 0x53  # 'S'
FE_TERMINATE: Final = 0x58  # 'X'
FE_COPY_DONE: Final = 0x63  # 'c'
FE_COPY_DATA: Final = 0x64  # 'd'
FE_COPY_FAIL: Final = 0x66  # 'f'
FE_PASSWORD: Final = 0x70  # 'p' (also SASLInitialResponse and SASLResponse)

# ---------------------------------------------------------------- backend

BE_PARSE_COMPLETE: Final = 0x31  # '1'
BE_BIND_COMPLETE: Final = 0x32  # '2'
BE_CLOSE_COMPLETE: Final = 0x33  # '3'
BE_NOTIFICATION: Final = 0x41  # 'A'
BE_COMMAND_COMPLETE: Final = 0x43  # 'C'
BE_DATA_ROW: Final = 0x44  # 'D'
BE_ERROR: Final = 0x45  # 'E'
BE_COPY_IN: Final = 0x47  # 'G'
BE_COPY_OUT: Final = 0x48  # 'H'
BE_EMPTY_QUERY: Final = 0x49  # 'I'
BE_BACKEND_KEY: Final = 0x4B  # 'K'
BE_NOTICE: Final = 0x4E  # 'N'
BE_AUTHENTICATION: Final = 0x52  # 'R'
BE_PARAMETER_STATUS: Final = 0x53  # 'S'
BE_ROW_DESCRIPTION: Final = 0x54  # 'T'
BE_COPY_BOTH: Final = 0x57  # 'W'
BE_READY: Final = 0x5A  # 'Z'
BE_COPY_DONE: Final = 0x63  # 'c'
BE_COPY_DATA: Final = 0x64  # 'd'
BE_NO_DATA: Final = 0x6E  # 'n'
BE_PORTAL_SUSPENDED: Final = 0x73  # 's'
BE_PARAMETER_DESCRIPTION: Final = 0x74  # 't'
BE_NEGOTIATE_VERSION: Final = 0x76  # 'v'

# What a client may send once logged in; anything else ends the connection.
FRONTEND_AFTER_LOGIN: Final = frozenset(
    (
        FE_BIND,
        FE_CLOSE,
        FE_DESCRIBE,
        FE_EXECUTE,
        FE_FUNCTION_CALL,
        FE_FLUSH,
        FE_PARSE,
        FE_QUERY,
        FE_SYNC,
        FE_TERMINATE,
        FE_COPY_DONE,
        FE_COPY_DATA,
        FE_COPY_FAIL,
    )
)
