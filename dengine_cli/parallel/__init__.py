"""The execution layer: how work spreads over the cores of this machine.

Threads of this process where numpy and the codecs let go of the GIL (:mod:`.threads`); forked
processes where Python holds it (:mod:`.forked`).  Stages never start either themselves: the
session hands them work through this layer, so that the same stage runs in a thread, a forked
worker or (later) a cluster worker."""
