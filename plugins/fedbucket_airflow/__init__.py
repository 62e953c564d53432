"""Airflow building blocks for fedbucket rounds, in the Airflow providers' split:

- :mod:`.hooks` talk to the federation bucket;
- :mod:`.operators` do one step of a round (open, run a Spark job, promote, report);
- :mod:`.sensors` and :mod:`.triggers` wait for a round's quorum or deadline (deferrable);
- :mod:`.params` turns the federation config into the DAG's trigger-form Params;
- :mod:`.dataproc` builds the Dataproc job specs for the provider's operators.

The round logic itself (settings, the wait decision, the gate, the report) is plain Python in
:mod:`fedbucket.server`, tested without Airflow; everything about the bucket comes from
:mod:`fedbucket.protocol`.
"""
