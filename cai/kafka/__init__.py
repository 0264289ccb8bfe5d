"""A single-node Apache Kafka broker (KRaft, broker and controller in one JVM) for development and tests."""
