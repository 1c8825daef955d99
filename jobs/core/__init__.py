"""The engine every pipeline runs on: command line, recipes, stages on Ray Data, the run
driver (plan → ingest → execute → export → manifest), Ray Data statistics and the run report.

A module here never imports a pipeline module: pipelines are named by import path in
``jobs.core.registry`` and loaded on demand.
"""
