"""The engine: stages as functions over numpy arrays, from page indexes to sharing and plans.

A stage takes arrays (and, where it must read pages, open dumps given by the session) and returns
data; it opens no file, reads no cache, holds no module state and names no command-line flag."""
