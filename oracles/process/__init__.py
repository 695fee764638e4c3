"""External-process oracles: any program that speaks the bbzo oracle protocol (``docs/custom_simulators.md``).

* :mod:`.protocol` -- the wire codec (pure, testable without processes);
* :mod:`.pipe` -- one running program: start, handshake, exchange, stderr, stop;
* :mod:`.oracle` -- :class:`ProcessOracle`, the :class:`~bbzo.oracle.Oracle` with its retry policy;
* :mod:`.pool` -- :class:`ProcessPool`, N copies with each call's rows split across them.
"""

from .oracle import ProcessOracle
from .pool import ProcessPool
from .protocol import FORMATS, PROTOCOL_VERSION

__all__ = ["ProcessOracle", "ProcessPool", "PROTOCOL_VERSION", "FORMATS"]
