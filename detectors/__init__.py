"""What the monitor watches and how it decides: rules and probes over SAE features.

The rule schema, engine, probes, discovery and the curated catalog arrive with the detectors
issue; the activation pipeline they read from lives in ``monitor``.
"""
