"""Stop strings over streamed text: emit what is final, hold back what may still become a stop."""

from __future__ import annotations


class StopMatcher:
    """Feed text deltas; get back the text safe to show and whether a stop string was reached.

    The returned text never contains a stop string nor anything after it. Text that could be the
    start of a stop string is held back until the next delta shows it is not (or `final=True`).
    """

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(stops)
        self.text = ""  # everything emitted so far
        self._pending = ""
        self.stopped = False

    def push(self, delta: str, final: bool = False) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            self.text += delta
            return delta, False
        buf = self._pending + delta
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = buf[:cut], ""
        else:
            hold = 0 if final else self._held_suffix(buf)
            out, self._pending = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out, self.stopped

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
