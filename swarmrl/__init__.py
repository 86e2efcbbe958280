"""swarmrl: decentralized GRPO post-training over ZeroMQ."""

__version__ = "0.1.0"
