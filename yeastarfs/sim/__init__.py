"""The project's PBX simulators: real HTTP servers on loopback with real WAV audio and
single-use randoms, for the tests, the benchmark and ``yeastarfs demo``.

Nothing here imports anything from yeastarfs outside ``yeastarfs.sim``: a misreading of
the PBX's API must never be shared by the client and the simulator.
"""

from yeastarfs.sim.pseries import PSeriesSimulator
from yeastarfs.sim.sseries import Simulator

__all__ = ["PSeriesSimulator", "Simulator"]
