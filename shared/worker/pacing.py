"""When a message may call Defender: now, after a short wait, or later from the queue.

A function must not sleep for long (it holds a host thread and a queue lease), so a message
whose slot is more than RATE_LIMIT_MAX_INLINE_WAIT_SECONDS away goes back to the queue with a
visibility delay, carrying the exact slot it reserved (`OffboardMessage.slot_at`). Queue
delays are whole seconds and the host polls at most every `maxPollingInterval`, so it is
sent to come back one to two seconds *before* its slot, and waits the rest inline: it calls
on time instead of up to a couple of seconds late. When it comes back, the slot is
checked again (`RateLimiter.still_valid`): a 429 penalty may have covered it since, or the
message may be too late to use it safely; then it reserves a new one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..adapters.rate_limit import RateLimiter

log = logging.getLogger(__name__)
# How long before its slot a re-queued message becomes visible again: queue delays are whole
# seconds, and the host may take up to maxPollingInterval to see the message.
RETURN_LEAD_SECONDS = 2.0


@dataclass
class Pacer:
    limiter: RateLimiter
    max_inline_wait: float
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time

    def admit(self, operation: str, held: float | None = None, tenant: str | None = None) -> float | None:
        """None when the call may go now (having waited inline if the slot was close);
        otherwise the reserved slot the caller must come back for."""
        if held is not None and self.limiter.still_valid(operation, held, tenant):
            slot = held
        else:
            if held is not None:
                log.info(
                    "The %s slot reserved for %.3f is no longer usable (now %+.3fs from it); reserving again",
                    operation,
                    held,
                    self.clock() - held,
                )
            slot = self.limiter.reserve_at(operation, tenant)
        wait = slot - self.clock()
        if wait > self.max_inline_wait:
            return slot
        if wait > 0:
            self.sleep(wait)
        return None

    def requeue_delay(self, slot: float) -> int:
        """Whole seconds of queue delay that bring a message back shortly before `slot`:
        visible between `lead` and `lead - 1` seconds before it, so it is picked up in time
        (host.json polls at least every 0.5 s) and then waits at most `max_inline_wait`."""
        lead = min(self.max_inline_wait, RETURN_LEAD_SECONDS)
        return max(0, math.ceil(slot - self.clock() - lead))

    def penalize(self, operation: str, seconds: float, tenant: str | None = None) -> float:
        return self.limiter.penalize(operation, seconds, tenant)

    def longest_window(self, operation: str) -> float:
        return self.limiter.longest_window(operation)
