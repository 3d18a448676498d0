"""How one delivery attempt fails: the bounded reasons that become metric labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeAlias

FailureReason: TypeAlias = Literal[
    "timeout",
    "connection",
    "rate_limited",
    "server_error",
    "client_error",
    "destination_refused",
    "redirect",
    "smtp_temporary",
    "smtp_permanent",
    "internal",
]


class DeliveryFailure(Exception):
    """One failed attempt. `permanent`: retrying cannot help."""

    def __init__(
        self,
        reason: FailureReason,
        detail: str,
        *,
        permanent: bool,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: FailureReason = reason
        self.detail = detail
        self.permanent = permanent
        self.retry_after = retry_after

    @classmethod
    def timed_out(cls, detail: str) -> DeliveryFailure:
        return cls("timeout", detail, permanent=False)

    @classmethod
    def unreachable(cls, host: str, exc: BaseException) -> DeliveryFailure:
        return cls("connection", f"{host}: {type(exc).__name__}", permanent=False)

    @classmethod
    def smtp(cls, codes: Sequence[int], detail: str) -> DeliveryFailure:
        """Only 4xx answers are worth retrying: the server asked to be tried again later."""
        temporary = bool(codes) and all(400 <= code < 500 for code in codes)
        reason: FailureReason = "smtp_temporary" if temporary else "smtp_permanent"
        return cls(reason, detail, permanent=not temporary)
