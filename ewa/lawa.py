"""The names bench/offline_lawa.py imports from here, now in ``ewa.merge`` (the one merge
engine). Kept only so bench/ runs unchanged until it imports ``ewa.merge`` itself; then delete."""

from ewa.merge import Merger as RunningAverage
from ewa.merge import Window, plan_windows, stream_averages, streaming_order

__all__ = ["RunningAverage", "Window", "plan_windows", "stream_averages", "streaming_order"]
