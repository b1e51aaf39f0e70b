"""Exact page sharing over several dumps: what identical-page sharing (ESX transparent page
sharing, KSM, the Difference Engine's first stage) saves when the VMs run on one host.

Sharing runs as stages over hash partitions, each a function over numpy arrays:

==================================  ===========================================================
stage                               in -> out
==================================  ===========================================================
:func:`~.partitions.sort_run`       a slice of one VM's index -> a run sorted by hash, cut into
                                    ``2 ** bits`` hash ranges
:func:`~.partitions.gather`         the pieces of one range from every run -> a partition
:func:`~.partitions.group_partition`  a partition -> its pages grouped by equal 128-bit hash
:func:`~.confirm.confirm_groups`    (``verify`` only) a grouping + page compares -> groups split
                                    by content, collisions counted
:func:`~.settle.settle`             a grouping -> per-VM sums, KSM counts, matrix, content ids
:class:`~.settle.SharingTotals`     the sums of every partition, in hash order -> the report
==================================  ===========================================================

Runs are kept by a :class:`RunStore`: in memory here (:class:`MemoryRuns`), or spilled to files
by the session when they would not fit in memory.  The figures are the same, byte for byte,
whatever the number of partitions, the slices, the store or the threads.
"""

# The package imports none of its modules: a command that reads a cached result imports only
# .model (the stages cost 25 ms of start-up).
