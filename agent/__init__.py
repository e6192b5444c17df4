"""Edge agent for the plant around hospital imaging scanners.

The agent reads vibration streams and polled device values, analyses them locally, and
sends compact msgpack summaries to a central collector through a durable SQLite buffer.
"""

__version__ = "0.1.0"
