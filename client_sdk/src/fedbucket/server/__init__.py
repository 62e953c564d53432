"""The server side, imported by the Airflow DAG, its plugins and the Spark jobs.

- :mod:`.config` — the federation's TOML config and the settings of one round run;
- :mod:`.rounds` — the round lifecycle on the bucket: open, wait decision, freeze, close;
- :mod:`.aggregation` — sharded aggregation (the engine-independent half of the Spark job);
- :mod:`.engine` — the engine type that maps work over Spark executors (or in-process);
- :mod:`.strategies` — FedAvg and friends, one class per strategy;
- :mod:`.evaluation` — scoring candidate and current model on the held-out split;
- :mod:`.promotion` — the promotion gate and the compare-and-swap on the model pointer;
- :mod:`.report` — the round report, built from what the round left in the bucket;
- :mod:`.initialise` — ``fedbucket init``.

Imports :mod:`fedbucket.protocol` (and :mod:`fedbucket.torch` for evaluation); never the client.
"""
