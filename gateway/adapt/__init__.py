"""The adaptation loop: the traffic log the gateway writes (records, log, writer), the
template fingerprints, and the shift detectors the `distillgate adapt` process runs."""
