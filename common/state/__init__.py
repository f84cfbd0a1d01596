"""The record of truth in Redis: experiments, the exactly-once step protocol, the ready index."""
