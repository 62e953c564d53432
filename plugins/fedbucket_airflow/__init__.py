"""Airflow building blocks for fedbucket rounds, in the Airflow providers' split:

- :mod:`.hooks` talk to the federation bucket;
- :mod:`.operators` do one step of a round (open, run a Spark job, promote, report);
- :mod:`.sensors` and :mod:`.triggers` wait for a round's quorum or deadline (deferrable);
- :mod:`.rounds` holds the round logic they share (round identity, settings, the wait rule).

Everything about the bucket itself (names, documents, validation) comes from ``fedbucket``.
"""
