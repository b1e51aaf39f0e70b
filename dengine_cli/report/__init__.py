"""`dengine report`: one self-contained HTML file of a fleet's figures with charts, and its data
as JSON and CSV.

:mod:`~dengine_cli.report.snapshots` groups dumps into VMs and finds the pages changed between a
VM's snapshots; :mod:`~dengine_cli.report.build` runs the session for every policy and snapshot;
:mod:`~dengine_cli.report.charts` draws the charts (matplotlib, imported only here);
:mod:`~dengine_cli.report.page` writes the HTML.  Nothing here is imported by ``analyze`` or
``plan``: matplotlib costs a report half a second to import.
"""
