"""mira on Flower (tested with flwr 1.42): the same strategies as the in-process engine, run across machines.

``server_app``/``client_app`` are the Flower components; ``server`` (``FlowerEngine``,
``Fleet``) drives the strategy; ``node`` (and ``worker`` for warm nodes) trains with
``client_fit``; ``protocol`` defines the messages; ``bundle``/``launch``/``cli`` submit
runs and start SuperLinks and SuperNodes; ``certs`` makes test certificates. See
``docs/flower.md``.
"""
