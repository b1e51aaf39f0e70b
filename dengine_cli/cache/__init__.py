"""Caches beside the dumps: page indexes and sharing results, their keys, and pruning.

Every cache file is an optimization: it is named and checked by the identity of the dumps it was
made from, written atomically, and anything that fails a check is a miss, never an error."""
