"""The parameters of a secure round, as the aggregator announces them and every client re-checks them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict

from .. import wire
from ..errors import FloraError
from .encoding import Encoding, EncodingError
from .messages import MessageError
from .schema import PARAMS


class ParamsError(FloraError, ValueError):
    """Secure-aggregation parameters that are unsound or unusable."""


@dataclass(frozen=True)
class SecAggParams:
    shares: int  # k: each client's neighbours (and holders of its secret shares); even
    threshold: int  # t: shares needed to recover a secret; k/2 < t <= k
    clients: int  # the most members a round of these parameters may have (sizes the ring)
    bits: int  # the ring Z_(2^bits): 32 or 64
    encoding: Encoding = field(default_factory=Encoding)
    stage_timeout_s: float = 60.0  # each stage after advertise-keys closes at the latest this long after it opens
    min_survivors: int = 2  # an unmasked sum covers at least this many clients (never one)

    def __post_init__(self) -> None:
        if self.shares < 2 or self.shares % 2:
            raise ParamsError(f"--shares must be even and >= 2, got {self.shares}")
        if not self.shares / 2 < self.threshold <= self.shares:
            raise ParamsError(f"--threshold must be > shares/2 and <= shares ({self.shares}), got {self.threshold}: "
                              "with t <= k/2 an aggregator could recover both secrets of one client")
        if self.clients < 2:
            raise ParamsError(f"secure aggregation needs room for >= 2 clients, got {self.clients}")
        if self.min_survivors < 2:
            raise ParamsError(f"min_survivors must be >= 2 (a sum of one is that client's update), got "
                              f"{self.min_survivors}")
        if not self.stage_timeout_s > 0:
            raise ParamsError(f"the stage timeout must be > 0, got {self.stage_timeout_s}")
        try:
            self.encoding.check(self.clients, self.bits)
        except EncodingError as exc:
            raise ParamsError(str(exc)) from exc

    @classmethod
    def sized(cls, clients: int, shares: int, threshold: int, encoding: Encoding, **kw: Any) -> SecAggParams:
        """Parameters with the narrowest ring that holds `clients` encodings (EncodingError if none does)."""
        try:
            bits = encoding.width(clients)
        except EncodingError as exc:
            raise ParamsError(str(exc)) from exc
        return cls(shares, threshold, clients, bits, encoding, **kw)

    def min_members(self) -> int:
        """Members a stage needs to go on: the survivors' minimum, and t + 1 (t neighbours and the client)."""
        return max(self.min_survivors, self.threshold + 1)

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> SecAggParams:
        """Parameters from the wire (`schema.PARAMS`: exact keys and types), re-checked for soundness;
        MessageError for anything else."""
        try:
            checked = PARAMS.check(d, "secagg")
            return cls(**{**checked, "encoding": Encoding(**checked["encoding"])})
        except wire.WireError as exc:
            raise MessageError(f"secagg parameters: {exc.detail}") from None
        except (EncodingError, ParamsError) as exc:
            raise MessageError(f"unusable secagg parameters: {exc}") from exc
