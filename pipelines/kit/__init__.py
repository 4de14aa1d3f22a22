"""The shared kit of the jobs (see `pipelines/__init__.py`); it imports no job. Nothing is imported here."""
